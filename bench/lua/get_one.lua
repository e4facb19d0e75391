-- GET /workflow/{uuid} of a random prefilled workflow (BENCH_ROWS of them).
dofile(os.getenv("BENCH_LUA") .. "/common.lua")
local rows = tonumber(os.getenv("BENCH_ROWS"))

function init(args)
  math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)") or "0", 16) % 1000003)
end

function request()
  return wrk.format("GET", "/workflow/" .. prefilled_uuid(math.random(1, rows)))
end
