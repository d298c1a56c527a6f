// What cron triggers. On a hosted project pg_cron + pg_net call these
// endpoints with the service_role key (see README, "Deploying to a Supabase
// project"); locally the stack's scheduler calls them on the same cadence.
interface Every {
  /** the pg_cron job name */
  name: string;
  /** cron expression used on the hosted project */
  cron: string;
  /** interval the local scheduler uses */
  everyMs: number;
}

/** A function endpoint, POSTed with the service role's key. */
export interface HttpSchedule extends Every {
  /** function path below /functions/v1 */
  path: string;
  /**
   * Already scheduled inside the database by a migration (pg_cron calling
   * SQL directly). The local scheduler still calls it, for databases without
   * pg_cron; the hosted cron SQL (scripts/cron_sql.ts) leaves it out.
   */
  inDatabase?: boolean;
  /**
   * The local scheduler calls again after this long, not at the next
   * interval, while the answer lists work it left (a non-empty `remaining`).
   */
  moreAfterMs?: number;
}

/**
 * A statement a migration schedules with pg_cron under `name`. The local
 * scheduler runs it only where pg_cron does not (a database other than
 * cron.database_name, or one without the extension).
 */
export interface SqlSchedule extends Every {
  sql: string;
}

export type Schedule = HttpSchedule | SqlSchedule;

export const SCHEDULES: Schedule[] = [
  {
    name: "maintain-partitions",
    cron: "15 0 * * *",
    everyMs: 24 * 3600_000,
    path: "observability/maintenance",
    inDatabase: true,
    // a backlog bigger than one call's time budget drains within minutes, not days
    moreAfterMs: 60_000,
  },
  {
    name: "sequence-events",
    cron: "* * * * *",
    everyMs: 60_000,
    sql: "select public.sequence_events()",
  },
  {
    name: "purge-transaction-idempotency-keys",
    cron: "25 * * * *",
    everyMs: 3600_000,
    sql: "select public.purge_transaction_idempotency_keys()",
  },
  {
    name: "run-jobs",
    cron: "* * * * *",
    everyMs: 60_000,
    path: "jobs/run",
  },
  {
    name: "whatsapp-dispatch",
    cron: "* * * * *",
    everyMs: 60_000,
    path: "whatsapp-webhook/dispatch",
  },
];
