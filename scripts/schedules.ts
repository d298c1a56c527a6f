// What cron triggers. On a hosted project pg_cron + pg_net call these
// endpoints with the service_role key (see README, "Deploying to a Supabase
// project"); locally the stack's scheduler calls them on the same cadence.
export interface Schedule {
  name: string;
  /** cron expression used on the hosted project */
  cron: string;
  /** interval the local scheduler uses */
  everyMs: number;
  /** function path below /functions/v1 */
  path: string;
  /**
   * Already scheduled inside the database by a migration (pg_cron calling
   * SQL directly). The local scheduler still calls it, for databases without
   * pg_cron; the hosted cron SQL (scripts/cron_sql.ts) leaves it out.
   */
  inDatabase?: boolean;
}

export const SCHEDULES: Schedule[] = [
  {
    name: "maintain-partitions",
    cron: "15 0 * * *",
    everyMs: 24 * 3600_000,
    path: "observability/maintenance",
    inDatabase: true,
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
