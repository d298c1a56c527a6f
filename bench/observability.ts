// record_metric through the observability function over HTTP vs. the same SQL
// call made directly, same database, same run, 16 concurrent clients.
// Target: HTTP reaches at least 0.6 of the direct SQL rate.
import postgres from "postgres";
import { BENCH_DB, measure, report, startApi } from "./lib.ts";

const CLIENTS = 16;
const api = await startApi({ DB_POOL_SIZE: String(CLIENTS) });
const sql = postgres(BENCH_DB, { max: CLIENTS, onnotice: () => {} });

try {
  const direct = await measure(CLIENTS, (_c, i) =>
    sql`select public.record_metric(
          p_service_name := 'api', p_metric_type := 'latency', p_metric_name := 'request_duration',
          p_value := ${i}, p_unit := 'ms', p_tags := ${sql.json({ endpoint: "/api/trips" })})`);

  const headers = {
    authorization: `Bearer ${api.serviceKey}`,
    "content-type": "application/json",
  };
  const http = await measure(CLIENTS, async (_c, i) => {
    const res = await fetch(`${api.url}/functions/v1/observability/metrics`, {
      method: "POST",
      headers,
      body: JSON.stringify({
        service_name: "api",
        metric_type: "latency",
        metric_name: "request_duration",
        value: i,
        unit: "ms",
        tags: { endpoint: "/api/trips" },
      }),
    });
    if (res.status !== 201) throw new Error(`HTTP ${res.status}: ${await res.text()}`);
    await res.body?.cancel();
  });

  report(
    `record_metric, ${CLIENTS} concurrent clients`,
    ["HTTP POST /observability/metrics", http],
    ["direct SQL select record_metric()", direct],
    0.6,
  );
} finally {
  await sql.end();
  await api.stop();
}
