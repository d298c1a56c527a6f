import process from "node:process";
import { z } from "zod";
const body = JSON.stringify({
  service_name: "api",
  metric_type: "latency",
  metric_name: "request_duration",
  value: 150,
  unit: "ms",
  tags: { endpoint: "/api/trips" },
});
function cpu(name: string, n: number, f: () => unknown) {
  const c0 = process.cpuUsage();
  for (let i = 0; i < n; i++) f();
  const c = process.cpuUsage(c0);
  console.log(name, ((c.user + c.system) / n).toFixed(2), "us");
}
async function acpu(name: string, n: number, f: () => Promise<unknown>) {
  const c0 = process.cpuUsage();
  for (let i = 0; i < n; i++) await f();
  const c = process.cpuUsage(c0);
  console.log(name, ((c.user + c.system) / n).toFixed(2), "us");
}
const metric = z.object({
  service_name: z.string().regex(/^[a-z0-9][a-z0-9_.-]{0,62}$/),
  metric_type: z.string().regex(/^[a-z][a-z0-9_]{0,31}$/),
  metric_name: z.string().regex(/^[a-zA-Z][a-zA-Z0-9_.:/-]{0,127}$/),
  value: z.number().finite(),
  unit: z.string().min(1).max(32).optional(),
  tags: z.record(z.string(), z.unknown()).optional(),
  correlation_id: z.string().optional(),
  recorded_at: z.iso.datetime({ offset: true }).optional(),
}).strict();
const u = z.union([metric, z.object({ metrics: z.array(metric).min(1).max(1000) }).strict()]);
const obj = JSON.parse(body);
cpu("zod union", 20000, () => u.safeParse(obj));
cpu("JSON.parse", 20000, () => JSON.parse(body));
await acpu("Request+arrayBuffer", 5000, async () => {
  const r = new Request("http://x/", { method: "POST", body });
  await r.arrayBuffer();
});
await acpu("Request+reader", 5000, async () => {
  const r = new Request("http://x/", { method: "POST", body });
  const rd = r.body!.getReader();
  for (;;) {
    const { done } = await rd.read();
    if (done) break;
  }
});
await acpu("Response.json", 5000, async () => {
  const r = Response.json({ id: "1", recorded: 1 }, { status: 201 });
  await r.text();
});
Deno.exit(0);
