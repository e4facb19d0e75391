-- POST /workflow with the benchmark body (BENCH_BODY: a file).
dofile(os.getenv("BENCH_LUA") .. "/common.lua")
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = read_file(os.getenv("BENCH_BODY"))
