-- GET /workflow?limit=100: the first page (the URL's own path and query).
dofile(os.getenv("BENCH_LUA") .. "/common.lua")
