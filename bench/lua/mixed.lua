-- A mixed load: 35 % POST, 30 % GET one, 10 % GET list page, 25 % consume.
dofile(os.getenv("BENCH_LUA") .. "/common.lua")
local rows = tonumber(os.getenv("BENCH_ROWS"))
local body = read_file(os.getenv("BENCH_BODY"))
local post_headers = {["Content-Type"] = "application/json"}

function init(args)
  math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)") or "0", 16) % 1000003)
end

function request()
  local r = math.random(100)
  if r <= 35 then
    return wrk.format("POST", "/workflow", post_headers, body)
  elseif r <= 65 then
    return wrk.format("GET", "/workflow/" .. prefilled_uuid(math.random(1, rows)))
  elseif r <= 75 then
    return wrk.format("GET", "/workflow?limit=100")
  else
    return wrk.format("POST", "/workflow/consume")
  end
end
