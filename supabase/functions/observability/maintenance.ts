// Partition maintenance over HTTP (POST /observability/maintenance), within
// the API's statement timeout. Run as one statement, a big DEFAULT backlog
// outlasted the timeout and the cancel rolled back everything, the months
// ahead too: next month's rows then went on piling up in DEFAULT. So it runs
// in steps, each its own transaction:
//   1. public.maintain_partitions(false): the months ahead, closing and
//      checking partitions, retention; no rows moved, so it stays short;
//   2. public.partition_backlog(): the months with rows waiting in DEFAULT;
//   3. public.maintain_partition_month() for one month after another, while
//      the time budget lasts (one at least, so every call gets on).
// A month that cannot move within the statement timeout is reported failed
// and the next month goes on. What is left is answered as `remaining`, for the
// next call; pg_cron's run, with no statement timeout, moves any month whole.
import type { Principal } from "../../../shared/auth.ts";
import { type Row, rpc } from "../../../shared/db.ts";
import { HttpError } from "../../../shared/errors.ts";
import { log } from "../../../shared/log.ts";

export interface Action {
  table_name: string | null;
  partition_name: string | null;
  action: string;
  rows_moved: number;
  detail: string | null;
}

export interface Remaining {
  table_name: string;
  partition_name: string;
  rows: number;
}

export interface MaintenanceSummary {
  actions: Action[];
  /** backlog months a later call moves (not reached, locks busy, failed) */
  remaining: Remaining[];
  /** "budget": months were left unreached; "drained": every month was tried */
  stopped: "drained" | "budget";
}

/** Actions that need someone to look, logged as a warning. */
const PROBLEMS = new Set(["failed", "clash", "misaligned"]);

const toAction = (r: Row): Action => ({
  table_name: r.table_name as string | null,
  partition_name: r.partition_name as string | null,
  action: r.action as string,
  rows_moved: Number(r.rows_moved),
  detail: r.detail as string | null,
});

export async function maintainPartitions(
  who: Principal,
  correlationId: string,
  budgetMs: number,
): Promise<MaintenanceSummary> {
  const started = performance.now();
  const actions = (await rpc(who, correlationId, "public.maintain_partitions", {
    move_backlog: false,
  })).map(toAction);
  const backlog = await rpc(who, correlationId, "public.partition_backlog");

  const remaining: Remaining[] = [];
  let stopped: MaintenanceSummary["stopped"] = "drained";
  for (const [i, month] of backlog.entries()) {
    const left = {
      table_name: month.table_name as string,
      partition_name: month.partition_name as string,
      rows: Number(month.rows),
    };
    if (i > 0 && performance.now() - started >= budgetMs) {
      stopped = "budget";
      remaining.push(left);
      continue;
    }
    const done = await moveMonth(who, correlationId, left, month.month as Date);
    actions.push(...done);
    if (done.some((a) => a.action === "skipped" || a.action === "failed")) remaining.push(left);
  }

  const problems = actions.filter((a) => PROBLEMS.has(a.action));
  if (problems.length > 0) {
    log("warn", "partition maintenance needs attention", {
      correlation_id: correlationId,
      problems,
    });
  }
  return { actions, remaining, stopped };
}

/** One backlog month moved in its own transaction; a timeout fails that month alone. */
async function moveMonth(
  who: Principal,
  correlationId: string,
  month: Remaining,
  start: Date,
): Promise<Action[]> {
  try {
    return (await rpc(who, correlationId, "public.maintain_partition_month", {
      table_name: month.table_name,
      // a date comes back as UTC midnight
      month: start.toISOString().slice(0, 10),
    })).map(toAction);
  } catch (err) {
    if (!(err instanceof HttpError && err.code === "timeout")) throw err;
    return [{
      table_name: month.table_name,
      partition_name: month.partition_name,
      action: "failed",
      rows_moved: 0,
      detail: `its ${month.rows} rows did not move within the statement timeout ` +
        "(DB_STATEMENT_TIMEOUT_MS); select public.maintain_partitions() moves them whole",
    }];
  }
}
