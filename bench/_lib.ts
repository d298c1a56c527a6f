// Shared helpers of the benchmarks: the bench database, service-role
// connections, parallel loops, and the one output format (ours, the peer,
// the ratio). Benchmarks are not tests: they print, they do not assert.
import PgBoss from "pg-boss";
import postgres from "postgres";

export type Sql = postgres.Sql;

export function benchUrl(): string {
  const url = Deno.env.get("BENCH_DATABASE_URL");
  if (!url) throw new Error("BENCH_DATABASE_URL is not set; run through `npm run bench`");
  return url;
}

/** One connection per worker, as the given role (PostgREST-style). */
export async function connections(n: number, role = "service_role"): Promise<Sql[]> {
  return await Promise.all(Array.from({ length: n }, async () => {
    const sql = postgres(benchUrl(), { max: 1, prepare: false, onnotice: () => {} });
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

export function percentile(samples: number[], p: number): number {
  const sorted = [...samples].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)];
}

const fmt = (n: number) => n >= 100 ? n.toFixed(0) : n.toFixed(2);

/** Prints one comparison line: ours, the peer, ours / peer. */
export function report(
  what: string,
  unit: string,
  ours: number,
  peerName: string,
  peer: number,
): void {
  console.log(
    `${what}: ours ${fmt(ours)} ${unit} | ${peerName} ${fmt(peer)} ${unit} | ratio ${
      (ours / peer).toFixed(2)
    }`,
  );
}

/** pg-boss on the bench database with a pool of `max`, without its cron and supervisor. */
export async function startPgBoss(max: number): Promise<PgBoss> {
  const boss = new PgBoss({ connectionString: benchUrl(), max, schedule: false, supervise: false });
  boss.on("error", (err) => console.error("pg-boss:", err));
  await boss.start();
  return boss;
}
