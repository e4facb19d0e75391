-- POST /workflow/consume: take one workflow (200 + CSV), or 204 when the queue is empty.
dofile(os.getenv("BENCH_LUA") .. "/common.lua")
wrk.method = "POST"
