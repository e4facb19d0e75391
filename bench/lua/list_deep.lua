-- GET /workflow?limit=100&after={uuid}: a keyset page from a random place in the table.
dofile(os.getenv("BENCH_LUA") .. "/common.lua")
local rows = tonumber(os.getenv("BENCH_ROWS"))

function init(args)
  math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)") or "0", 16) % 1000003)
end

function request()
  local after = prefilled_uuid(math.random(1, math.max(1, rows - 100)))
  return wrk.format("GET", "/workflow?limit=100&after=" .. after)
end
