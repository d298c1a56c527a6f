// The local stand-in for pg_cron + pg_net: POSTs each scheduled endpoint with
// the service_role key, and runs the SQL jobs pg_cron does not run in this
// database. One run of a schedule at a time; failures are logged and the next
// tick tries again.
import { log } from "../shared/log.ts";
import { type Schedule, SCHEDULES } from "./schedules.ts";

export function startScheduler(
  apiUrl: string,
  serviceKey: string,
  runSql: (sql: string) => Promise<unknown>,
  schedules: Schedule[] = SCHEDULES,
): () => void {
  const timers: ReturnType<typeof setTimeout>[] = [];
  const followUps = new Set<ReturnType<typeof setTimeout>>();
  const running = new Set<string>();
  let stopped = false;

  function later(run: () => void, ms: number) {
    if (stopped) return;
    const timer = setTimeout(() => {
      followUps.delete(timer);
      run();
    }, ms);
    followUps.add(timer);
  }

  async function tick(s: Schedule) {
    if (running.has(s.name)) return;
    running.add(s.name);
    const started = performance.now();
    try {
      if ("sql" in s) {
        await runSql(s.sql);
        log("info", "schedule ran", {
          schedule: s.name,
          duration_ms: Math.round(performance.now() - started),
        });
        return;
      }
      const res = await fetch(`${apiUrl}/functions/v1/${s.path}`, {
        method: "POST",
        headers: { authorization: `Bearer ${serviceKey}`, "content-type": "application/json" },
        body: "{}",
        signal: AbortSignal.timeout(150_000),
      });
      const again = s.moreAfterMs;
      let more = false;
      if (res.ok && again !== undefined) {
        more = leftWork(await res.json().catch(() => null));
      } else {
        await res.body?.cancel();
      }
      log(res.ok ? "info" : "warn", "schedule ran", {
        schedule: s.name,
        status: res.status,
        duration_ms: Math.round(performance.now() - started),
        ...(more ? { again_in_ms: again } : {}),
      });
      if (more && again !== undefined) later(() => tick(s), again);
    } catch (err) {
      log("warn", "schedule failed", { schedule: s.name, error: String(err) });
    } finally {
      running.delete(s.name);
    }
  }

  for (const s of schedules) {
    timers.push(setTimeout(() => tick(s), 1000));
    timers.push(setInterval(() => tick(s), s.everyMs));
  }
  return () => {
    stopped = true;
    [...timers, ...followUps].forEach((t) => clearTimeout(t));
  };
}

/** An answer that says it left work for a later call (`remaining`, non-empty). */
function leftWork(body: unknown): boolean {
  const remaining = (body as { remaining?: unknown } | null)?.remaining;
  return Array.isArray(remaining) && remaining.length > 0;
}
