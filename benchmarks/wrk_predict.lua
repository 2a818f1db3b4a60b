-- wrk script for benchmarks/serve.py: POST the multipart body in $CAPAS_WRK_BODY to /predict.
-- By hand: CAPAS_WRK_BODY=body.bin wrk -t1 -c8 -d10s --latency -s benchmarks/wrk_predict.lua http://127.0.0.1:8000/predict
local file = assert(io.open(os.getenv("CAPAS_WRK_BODY"), "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = "multipart/form-data; boundary=capasbenchboundary"
