// Shared pieces of the benchmarks: a closed-loop load runner, the local API
// as a subprocess (the shape it has in production: its own process and pool),
// and result printing. Benchmarks print figures; they assert nothing.
import { signKey } from "../scripts/keys.ts";

export const BENCH_DB = Deno.env.get("BENCH_DATABASE_URL") ??
  "postgresql://postgres:postgres@127.0.0.1:54322/easymo_bench";
export const BENCH_SECONDS = Number(Deno.env.get("BENCH_SECONDS") ?? "8");
const BENCH_SECRET = "bench-secret-bench-secret-bench-secret-0123";

export interface Rate {
  ops: number;
  seconds: number;
  perSecond: number;
  p50Ms: number;
  p99Ms: number;
}

/** Runs `op` in `clients` closed loops for `seconds` after a short warm-up. */
export async function measure(
  clients: number,
  op: (client: number, i: number) => Promise<unknown>,
  seconds = BENCH_SECONDS,
): Promise<Rate> {
  const warmupEnd = performance.now() + 1000;
  await Promise.all(
    Array.from({ length: clients }, async (_, c) => {
      for (let i = 0; performance.now() < warmupEnd; i++) await op(c, -1 - i);
    }),
  );
  const latencies: number[] = [];
  const start = performance.now();
  const end = start + seconds * 1000;
  let ops = 0;
  await Promise.all(
    Array.from({ length: clients }, async (_, c) => {
      for (let i = 0; performance.now() < end; i++) {
        const t = performance.now();
        await op(c, i);
        latencies.push(performance.now() - t);
        ops++;
      }
    }),
  );
  const elapsed = (performance.now() - start) / 1000;
  latencies.sort((a, b) => a - b);
  const at = (q: number) =>
    latencies[Math.min(latencies.length - 1, Math.floor(q * latencies.length))];
  return { ops, seconds: elapsed, perSecond: ops / elapsed, p50Ms: at(0.5), p99Ms: at(0.99) };
}

export function fmtRate(r: Rate): string {
  return `${r.perSecond.toFixed(0).padStart(7)} ops/s  (p50 ${r.p50Ms.toFixed(2)} ms, p99 ${
    r.p99Ms.toFixed(2)
  } ms, ${r.ops} ops)`;
}

export function report(title: string, ours: [string, Rate], peer: [string, Rate], target?: number) {
  const ratio = ours[1].perSecond / peer[1].perSecond;
  console.log(`\n${title}`);
  console.log(`  ${ours[0].padEnd(34)} ${fmtRate(ours[1])}`);
  console.log(`  ${peer[0].padEnd(34)} ${fmtRate(peer[1])}`);
  console.log(
    `  ratio ours/peer = ${ratio.toFixed(2)}${
      target === undefined ? "" : `  (target >= ${target}: ${ratio >= target ? "met" : "MISSED"})`
    }`,
  );
}

export interface LocalApi {
  url: string;
  serviceKey: string;
  anonKey: string;
  secret: string;
  stop: () => Promise<void>;
}

/** Starts scripts/serve.ts as its own process against the bench database. */
export async function startApi(env: Record<string, string> = {}): Promise<LocalApi> {
  const probe = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (probe.addr as Deno.NetAddr).port;
  probe.close();
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--allow-all",
      "--quiet",
      new URL("../scripts/serve.ts", import.meta.url).pathname,
    ],
    env: {
      DATABASE_URL: BENCH_DB,
      API_PORT: String(port),
      SCHEDULER: "off",
      LOG_LEVEL: "warn",
      JWT_SECRET: BENCH_SECRET,
      ...env,
    },
    stdout: "null",
    stderr: "inherit",
  }).spawn();
  const url = `http://127.0.0.1:${port}`;
  for (let i = 0; i < 100; i++) {
    try {
      const res = await fetch(`${url}/functions/v1/none`);
      await res.body?.cancel();
      break;
    } catch {
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  return {
    url,
    secret: BENCH_SECRET,
    serviceKey: await signKey("service_role", BENCH_SECRET),
    anonKey: await signKey("anon", BENCH_SECRET),
    stop: async () => {
      try {
        child.kill("SIGTERM");
      } catch {
        // already gone
      }
      await child.status;
    },
  };
}

/** Runs pgbench with a custom script; returns transactions per second. */
export async function pgbench(
  script: string,
  clients: number,
  seconds = BENCH_SECONDS,
  url = BENCH_DB,
) {
  const file = await Deno.makeTempFile({ suffix: ".sql" });
  await Deno.writeTextFile(file, script);
  const u = new URL(url);
  const bin = `${Deno.env.get("PGBIN") ?? "/usr/lib/postgresql/15/bin"}/pgbench`;
  const out = await new Deno.Command(bin, {
    args: [
      "-n",
      "-c",
      String(clients),
      "-j",
      "2",
      "-T",
      String(seconds),
      "-f",
      file,
      "-h",
      u.hostname,
      "-p",
      u.port || "5432",
      "-U",
      decodeURIComponent(u.username),
      u.pathname.slice(1),
    ],
    env: { PGPASSWORD: decodeURIComponent(u.password) },
  }).output();
  await Deno.remove(file);
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  const tps = /tps = ([\d.]+) \(without initial connection time\)/.exec(text);
  const failed = /number of failed transactions: (\d+)/.exec(text);
  if (!out.success || !tps) throw new Error(`pgbench failed:\n${text}`);
  if (failed && Number(failed[1]) > 0) throw new Error(`pgbench had failures:\n${text}`);
  return Number(tps[1]);
}

/** Runs wrk (a C HTTP load generator) with one request shape; returns requests per second. */
export async function wrk(
  url: string,
  req: { method: string; headers: Record<string, string>; body?: string },
  connections: number,
  seconds = BENCH_SECONDS,
) {
  const lua = await Deno.makeTempFile({ suffix: ".lua" });
  const q = (s: string) => JSON.stringify(s);
  await Deno.writeTextFile(
    lua,
    [
      `wrk.method = ${q(req.method)}`,
      req.body ? `wrk.body = ${q(req.body)}` : "",
      ...Object.entries(req.headers).map(([k, v]) => `wrk.headers[${q(k)}] = ${q(v)}`),
    ].join("\n"),
  );
  const out = await new Deno.Command("wrk", {
    args: ["-t", "2", "-c", String(connections), "-d", `${seconds}s`, "-s", lua, url],
  }).output();
  await Deno.remove(lua);
  const text = new TextDecoder().decode(out.stdout);
  const rps = /Requests\/sec:\s+([\d.]+)/.exec(text);
  if (!out.success || !rps) {
    throw new Error(`wrk failed:\n${text}${new TextDecoder().decode(out.stderr)}`);
  }
  const bad = /Non-2xx or 3xx responses: (\d+)/.exec(text);
  if (bad) throw new Error(`wrk saw ${bad[1]} error responses:\n${text}`);
  return Number(rps[1]);
}

/** Prints two throughputs side by side with their ratio. */
export function reportRates(
  title: string,
  ours: [string, number],
  peer: [string, number],
  target?: number,
) {
  const ratio = ours[1] / peer[1];
  console.log(`\n${title}`);
  console.log(`  ${ours[0].padEnd(44)} ${ours[1].toFixed(0).padStart(8)} /s`);
  console.log(`  ${peer[0].padEnd(44)} ${peer[1].toFixed(0).padStart(8)} /s`);
  console.log(
    `  ratio ours/peer = ${ratio.toFixed(2)}${
      target === undefined ? "" : `  (target >= ${target}: ${ratio >= target ? "met" : "MISSED"})`
    }`,
  );
  return ratio;
}
