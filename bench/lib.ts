// The benchmarks' shared pieces: the bench database, connections as an API
// role, parallel loops, the local API as its own process (its production
// shape), the C load generators (pgbench, wrk), pg-boss, and the one output
// format: ours, the peer, the ratio. Benchmarks print; they assert nothing.
import PgBoss from "pg-boss";
import postgres from "postgres";
import { signKey } from "../scripts/keys.ts";

export type Sql = postgres.Sql;

export const BENCH_DB = Deno.env.get("BENCH_DATABASE_URL") ??
  "postgresql://postgres:postgres@127.0.0.1:54322/easymo_bench";
export const BENCH_SECONDS = Number(Deno.env.get("BENCH_SECONDS") ?? "8");
export const PGBIN = Deno.env.get("PGBIN") ?? "/usr/lib/postgresql/15/bin";
export const BENCH_SECRET = "bench-secret-bench-secret-bench-secret-0123";

// --- output --------------------------------------------------------------------

const fmt = (n: number) => n >= 100 ? n.toFixed(0) : n.toFixed(2);

/** Prints one comparison line: ours, the peer, ours / peer, and the target if there is one. */
export function report(
  what: string,
  unit: string,
  ours: number,
  peerName: string,
  peer: number,
  target?: number,
): number {
  const ratio = ours / peer;
  const verdict = target === undefined
    ? ""
    : ` (target >= ${target}: ${ratio >= target ? "met" : "MISSED"})`;
  console.log(
    `${what}: ours ${fmt(ours)} ${unit} | ${peerName} ${fmt(peer)} ${unit} | ratio ${
      // three places against a target, so that 0.697 does not print as a missed 0.70
      ratio.toFixed(target === undefined ? 2 : 3)}${verdict}`,
  );
  return ratio;
}

export function percentile(samples: number[], p: number): number {
  const sorted = [...samples].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)];
}

// --- database clients and loops -----------------------------------------------

/** One connection per worker, as the given role (PostgREST-style). */
export async function connections(n: number, role = "service_role"): Promise<Sql[]> {
  return await Promise.all(Array.from({ length: n }, async () => {
    const sql = postgres(BENCH_DB, { max: 1, prepare: false, onnotice: () => {} });
    await sql`select set_config('role', ${role}, false),
                     set_config('request.jwt.claims', ${JSON.stringify({ role })}, false)`;
    return sql;
  }));
}

export async function closeAll(sqls: Sql[]): Promise<void> {
  await Promise.all(sqls.map((s) => s.end()));
}

/** Runs `body(worker, i)` for i in 0..total-1, shared by the workers; returns seconds. */
export async function spread(
  workers: number,
  total: number,
  body: (worker: number, i: number) => Promise<void>,
): Promise<number> {
  let next = 0;
  const started = performance.now();
  await Promise.all(Array.from({ length: workers }, async (_, w) => {
    for (let i = next++; i < total; i = next++) await body(w, i);
  }));
  return (performance.now() - started) / 1000;
}

/** Runs `body(worker)` on every worker until it returns 0 items; returns seconds. */
export async function drain(
  workers: number,
  body: (worker: number) => Promise<number>,
): Promise<number> {
  const started = performance.now();
  await Promise.all(Array.from({ length: workers }, async (_, w) => {
    while ((await body(w)) > 0) { /* keep going */ }
  }));
  return (performance.now() - started) / 1000;
}

/** `clients` closed loops of `op` for `seconds` after a one-second warm-up; ops per second. */
export async function measure(
  clients: number,
  op: (client: number, i: number) => Promise<unknown>,
  seconds = BENCH_SECONDS,
): Promise<number> {
  const loop = async (until: number, count: boolean) => {
    let ops = 0;
    await Promise.all(Array.from({ length: clients }, async (_, c) => {
      for (let i = 0; performance.now() < until; i++) {
        await op(c, i);
        if (count) ops++;
      }
    }));
    return ops;
  };
  await loop(performance.now() + 1000, false);
  const started = performance.now();
  const ops = await loop(started + seconds * 1000, true);
  return ops / ((performance.now() - started) / 1000);
}

/** pg-boss on the bench database with a pool of `max`, without its cron and supervisor. */
export async function startPgBoss(max: number): Promise<PgBoss> {
  const boss = new PgBoss({ connectionString: BENCH_DB, max, schedule: false, supervise: false });
  boss.on("error", (err) => console.error("pg-boss:", err));
  await boss.start();
  return boss;
}

// --- load generators -----------------------------------------------------------

/** pgbench's arguments for a timed run: no vacuum, `clients` clients, `seconds` seconds. */
export const timed = (clients: number, seconds = BENCH_SECONDS, extra: string[] = []) => [
  "-n",
  "-c",
  String(clients),
  "-j",
  "2",
  "-T",
  String(seconds),
  ...extra,
];

/**
 * One pgbench run, with a custom script or a built-in one; transactions per
 * second. `options` become the sessions' settings (PGOPTIONS), e.g. the role
 * and the JWT claims an API request carries.
 */
export async function pgbench(
  args: string[],
  script?: string,
  url = BENCH_DB,
  options = "",
): Promise<number> {
  const file = script ? await Deno.makeTempFile({ suffix: ".sql" }) : undefined;
  if (file) await Deno.writeTextFile(file, script!);
  const out = await new Deno.Command(`${PGBIN}/pgbench`, {
    args: [...args, ...(file ? ["-f", file] : []), url],
    env: { PGOPTIONS: options },
  }).output();
  if (file) await Deno.remove(file);
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  const tps = /tps = ([\d.]+) \(without initial connection time\)/.exec(text);
  if (!out.success || !tps) throw new Error(`pgbench ${args.join(" ")} failed:\n${text}`);
  const failed = /number of failed transactions: (\d+)/.exec(text);
  if (failed && failed[1] !== "0") throw new Error(`pgbench had failures:\n${text}`);
  return Number(tps[1]);
}

/**
 * Latencies in ms of `transactions` runs of `script` by one pgbench client (a C
 * client: libpq takes in every row, nothing parses them), after 20 runs on the
 * same connection that are not counted (its caches and plans), with the
 * sessions' settings `options` as for pgbench().
 */
export async function pgbenchLatencies(
  script: string,
  transactions: number,
  options = "",
): Promise<number[]> {
  const WARMUP = 20;
  const dir = await Deno.makeTempDir();
  try {
    const runs = String(WARMUP + transactions);
    await pgbench(
      ["-n", "-c", "1", "-t", runs, "-l", `--log-prefix=${dir}/log`],
      script,
      BENCH_DB,
      options,
    );
    const logs: string[] = [];
    for await (const entry of Deno.readDir(dir)) {
      logs.push(await Deno.readTextFile(`${dir}/${entry.name}`));
    }
    // one line per transaction, in order: client, transaction, latency in us, ...
    const lines = logs.join("").trim().split("\n");
    if (lines.length !== WARMUP + transactions) {
      throw new Error(`pgbench logged ${lines.length} transactions`);
    }
    return lines.slice(WARMUP).map((line) => Number(line.split(" ")[2]) / 1000);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** pgbench's own tables (`pgbench -i`) at the given scale, for its built-in scripts. */
export async function pgbenchInit(scale: number, url = BENCH_DB): Promise<void> {
  const out = await new Deno.Command(`${PGBIN}/pgbench`, {
    args: ["-i", "-s", String(scale), "-q", url],
  }).output();
  if (!out.success) throw new Error(`pgbench -i failed: ${new TextDecoder().decode(out.stderr)}`);
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

// --- the local API ---------------------------------------------------------------

export interface LocalApi {
  url: string;
  serviceKey: string;
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
  for (let i = 0;; i++) {
    try {
      await (await fetch(`${url}/functions/v1/none`)).body?.cancel();
      break;
    } catch {
      if (i > 100) throw new Error("the local API did not start");
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  return {
    url,
    serviceKey: await signKey("service_role", BENCH_SECRET),
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
