// record_metric through the observability function over HTTP vs. the same SQL
// call made directly, same database, same run, 16 concurrent clients.
// Target: HTTP reaches at least 0.6 of the direct SQL rate.
//
// Two direct peers: postgres.js (16 connections, prepared statements), the way
// a backend service calls the SQL, and pgbench, the cheapest client there is.
// HTTP is driven by wrk. Rounds interleave so noise on the shared machine hits
// every side.
import postgres from "postgres";
import { BENCH_DB, measure, pgbench, report, startApi, timed, wrk } from "./lib.ts";

const CLIENTS = 16;
const ROUNDS = Number(Deno.env.get("BENCH_ROUNDS") ?? "2");
const api = await startApi({ DB_POOL_SIZE: String(CLIENTS) });
const sql = postgres(BENCH_DB, { max: CLIENTS, onnotice: () => {} });
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
  console.log(`record_metric, ${CLIENTS} concurrent clients, ${ROUNDS} rounds`);
  const vsDriver: number[] = [];
  const vsPgbench: number[] = [];
  for (let round = 1; round <= ROUNDS; round++) {
    const http = await wrk(`${api.url}/functions/v1/observability/metrics`, request, CLIENTS);
    const driver = await measure(CLIENTS, (_c, i) =>
      sql`select public.record_metric(
            p_service_name := 'api', p_metric_type := 'latency', p_metric_name := 'request_duration',
            p_value := ${i}, p_unit := 'ms', p_tags := ${sql.json({ endpoint: "/api/trips" })})`);
    const bench = await pgbench(timed(CLIENTS), sqlScript);
    vsDriver.push(
      report(`round ${round}, HTTP (wrk)`, "/s", http, "direct SQL, postgres.js", driver, 0.6),
    );
    vsPgbench.push(report(`round ${round}, HTTP (wrk)`, "/s", http, "direct SQL, pgbench", bench));
  }
  const mean = (xs: number[]) => (xs.reduce((a, b) => a + b) / xs.length).toFixed(2);
  console.log(
    `mean ratio HTTP / direct postgres.js: ${mean(vsDriver)}; HTTP / pgbench: ${mean(vsPgbench)}`,
  );
} finally {
  await sql.end();
  await api.stop();
}
