// record_metric through the observability function over HTTP vs. the same SQL
// call made directly, same database, same run, 16 concurrent clients.
// Target: HTTP reaches at least 0.6 of the direct SQL rate.
//
// Both sides use a C load generator (wrk for HTTP, pgbench for SQL) so the
// comparison measures the server path, not the client's runtime. Two rounds,
// interleaved, so a burst of noise on the shared machine hits both.
import { BENCH_DB, pgbench, reportRates, startApi, wrk } from "./lib.ts";

const CLIENTS = 16;
const api = await startApi({ DB_POOL_SIZE: String(CLIENTS) });
const sqlScript =
  `select public.record_metric(p_service_name := 'api', p_metric_type := 'latency', ` +
  `p_metric_name := 'request_duration', p_value := 150, p_unit := 'ms', ` +
  `p_tags := '{"endpoint": "/api/trips"}'::jsonb);\n`;
const request = {
  method: "POST",
  headers: { authorization: `Bearer ${api.serviceKey}`, "content-type": "application/json" },
  body: JSON.stringify({
    service_name: "api",
    metric_type: "latency",
    metric_name: "request_duration",
    value: 150,
    unit: "ms",
    tags: { endpoint: "/api/trips" },
  }),
};

try {
  console.log(`database: ${BENCH_DB.replace(/\/\/[^@]*@/, "//")}`);
  const ratios: number[] = [];
  for (let round = 1; round <= 2; round++) {
    const direct = await pgbench(sqlScript, CLIENTS);
    const http = await wrk(`${api.url}/functions/v1/observability/metrics`, request, CLIENTS);
    ratios.push(reportRates(
      `record_metric, ${CLIENTS} concurrent clients, round ${round}`,
      ["HTTP POST /observability/metrics (wrk)", http],
      ["direct SQL select record_metric() (pgbench)", direct],
      0.6,
    ));
  }
  console.log(
    `\nmean ratio over rounds: ${(ratios.reduce((a, b) => a + b) / ratios.length).toFixed(2)}`,
  );
} finally {
  await api.stop();
}
