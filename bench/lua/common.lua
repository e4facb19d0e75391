-- Shared by every wrk script: counts responses by status in each thread and, when the
-- run ends, prints one line `BENCH_JSON {...}` that bench/bench.py parses.
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

statuses = {}

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

-- A prefilled workflow's uuid (see bench/sql.py): n in the last 12 hex digits.
function prefilled_uuid(n)
  return string.format("01000000-0000-7000-8000-%012x", n)
end

function read_file(path)
  local file = assert(io.open(path, "rb"))
  local text = file:read("*a")
  file:close()
  return text
end

function done(summary, latency, requests)
  local counts = {}
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses")) do
      counts[status] = (counts[status] or 0) + count
    end
  end
  local parts = {}
  for status, count in pairs(counts) do
    table.insert(parts, string.format('"%d":%d', status, count))
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"duration_us":%d,"requests":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"mean_us":%.1f,"errors":{"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d},"statuses":{%s}}\n',
    summary.duration, summary.requests, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean, e.connect, e.read, e.write,
    e.status, e.timeout, table.concat(parts, ",")))
end
