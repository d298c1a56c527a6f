// The local API: every function under /functions/v1/<name> on 127.0.0.1:54321,
// the scheduler, and the keys printed the way `supabase status` prints them.
import { verifyToken } from "../shared/auth.ts";
import { closeDb, db } from "../shared/db.ts";
import { ConfigError, env } from "../shared/env.ts";
import { whatsappConfig } from "../shared/whatsapp.ts";
import { LOCAL_JWT_SECRET, type StackKeys, stackKeys } from "./keys.ts";
import { createRouter, loadFunctions } from "./router.ts";
import { startScheduler } from "./scheduler.ts";
import { type Schedule, SCHEDULES } from "./schedules.ts";
import { startWhatsAppSandbox } from "./whatsapp_sandbox.ts";

const port = Number(Deno.env.get("API_PORT") ?? "54321");
const dbUrl = Deno.env.get("DATABASE_URL");
if (!dbUrl) {
  console.error("DATABASE_URL is required (npm start sets it)");
  Deno.exit(1);
}
// the database npm start has just migrated, whatever the shell had exported
Deno.env.set("SUPABASE_DB_URL", dbUrl);
if (!Deno.env.get("JWT_SECRET") && !Deno.env.get("SUPABASE_JWKS") && !Deno.env.get("JWKS_URL")) {
  Deno.env.set("JWT_SECRET", LOCAL_JWT_SECRET);
}
const apiUrl = `http://127.0.0.1:${port}`;
Deno.env.set("SUPABASE_URL", Deno.env.get("SUPABASE_URL") ?? apiUrl);

const schedulerOn = Deno.env.get("SCHEDULER") !== "off";

/** A port another process holds (most often a second npm start) ends the start with one line. */
function exitIfPortTaken(err: unknown, what: string, portVar: string): never {
  // Deno.serve throws AddrInUse; the sandbox's node:http server, an error coded EADDRINUSE
  if (err instanceof Deno.errors.AddrInUse || (err as { code?: string })?.code === "EADDRINUSE") {
    console.error(
      `${what}: its port is in use. Is another npm start running? Stop it, or set ${portVar}.`,
    );
    Deno.exit(1);
  }
  throw err;
}

/**
 * Ends the start with one line when the functions could not serve a request:
 * a malformed variable (read lazily by the functions, so it would otherwise
 * surface as a 500 on every request) or a database URL their client cannot
 * use (psql and the Supabase CLI read some that postgres.js does not).
 */
async function exitUnlessReady(): Promise<void> {
  try {
    env();
    whatsappConfig();
  } catch (err) {
    if (!(err instanceof ConfigError)) throw err;
    console.error(err.message);
    Deno.exit(1);
  }
  try {
    await db()`select 1`;
  } catch (err) {
    console.error(`the functions cannot use DATABASE_URL: ${(err as Error).message}`);
    Deno.exit(1);
  }
}

/**
 * The scheduler calls the endpoints as the service role: without a key the
 * functions accept (only a JWKS, nothing to sign one with), every tick would
 * be a 401 in the log. The start stops instead, saying what to set.
 */
async function schedulerKeyOrExit(keys: StackKeys): Promise<string> {
  if (!keys.service) {
    console.error(
      "the scheduler has no service_role key: with SUPABASE_JWKS or JWKS_URL and no JWT_SECRET, " +
        "set SUPABASE_SERVICE_ROLE_KEY or SUPABASE_SECRET_KEYS (or SCHEDULER=off)",
    );
    Deno.exit(1);
  }
  let problem: string | undefined;
  try {
    const { role } = await verifyToken(keys.service);
    if (role !== "service_role") problem = `it is a key for ${role}`;
  } catch (err) {
    problem = (err as Error).message;
  }
  if (problem) {
    console.error(
      `the scheduler's service_role key (${keys.serviceFrom}) is refused by the functions: ` +
        `${problem} (set a key they accept, or SCHEDULER=off)`,
    );
    Deno.exit(1);
  }
  return keys.service;
}

/** The schedules to run here: every endpoint, and the SQL jobs pg_cron does not run in this database. */
async function localSchedules(): Promise<Schedule[]> {
  const [{ cron }] = await db()`select to_regclass('cron.job') is not null as cron`;
  const scheduled = new Set(
    cron ? (await db()`select jobname from cron.job`).map((j) => j.jobname as string) : [],
  );
  return SCHEDULES.filter((s) => !("sql" in s) || !scheduled.has(s.name));
}

const whatsappSandbox = await startWhatsAppSandbox().catch((err) =>
  exitIfPortTaken(err, "the WhatsApp sandbox", "WHATSAPP_SANDBOX_PORT")
);
await exitUnlessReady();
const keys = await stackKeys({
  ...env(),
  anonKey: Deno.env.get("SUPABASE_ANON_KEY") || undefined,
  serviceRoleKey: Deno.env.get("SUPABASE_SERVICE_ROLE_KEY") || undefined,
});
if (keys.anon) Deno.env.set("SUPABASE_ANON_KEY", keys.anon);
if (keys.service) Deno.env.set("SUPABASE_SERVICE_ROLE_KEY", keys.service);
const schedulerKey = schedulerOn ? await schedulerKeyOrExit(keys) : undefined;
const schedules = await localSchedules();
const apps = await loadFunctions();
let server: Deno.HttpServer;
try {
  server = Deno.serve({ port, hostname: "127.0.0.1", onListen: () => {} }, createRouter(apps));
} catch (err) {
  exitIfPortTaken(err, `the API on ${apiUrl}`, "API_PORT");
}

const redacted = dbUrl.replace(/\/\/([^:@/]+):[^@/]*@/, "//$1:***@")
  .replace(/([?&]password=)[^&]*/gi, "$1***");
const scheduled = schedulerOn ? schedules.map((s) => s.name).join(", ") : "off";
console.log(`
EasyMO local stack is running.

         API URL: ${apiUrl}
   Functions URL: ${apiUrl}/functions/v1/{${[...apps.keys()].join(",")}}
          DB URL: ${redacted}
       Scheduler: ${scheduled}
      JWT secret: ${keys.secret}
${keys.jwks ? `            JWKS: ${keys.jwks}\n` : ""}        anon key: ${
  keys.anon ?? "(none: set SUPABASE_ANON_KEY or SUPABASE_PUBLISHABLE_KEYS)"
}
service_role key: ${keys.service ?? "(none: set SUPABASE_SERVICE_ROLE_KEY or SUPABASE_SECRET_KEYS)"}
${whatsappSandbox ? "\n" + whatsappSandbox.banner + "\n" : ""}
Press Ctrl-C to stop.
`);

const stopScheduler = schedulerKey
  ? startScheduler(apiUrl, schedulerKey, (sql) => db().unsafe(sql), schedules)
  : () => {};

// Requests in flight get this long to finish on Ctrl-C: a jobs run cut off
// would leave its job running until its lease ends, like a crash.
const GRACE_MS = 10_000;

let stopping = false;
async function shutdown(signal: string) {
  if (stopping) {
    console.log(`${signal} again: stopping now`);
    Deno.exit(1);
  }
  stopping = true;
  console.log(
    `\n${signal}: stopping the API (up to ${
      GRACE_MS / 1000
    } s for requests in flight; ${signal} again to stop now)`,
  );
  stopScheduler();
  let timer: ReturnType<typeof setTimeout> | undefined;
  await Promise.race([
    server.shutdown(),
    new Promise((done) => (timer = setTimeout(done, GRACE_MS))),
  ]);
  clearTimeout(timer);
  await whatsappSandbox?.close();
  await closeDb();
  Deno.exit(0);
}
Deno.addSignalListener("SIGINT", () => shutdown("SIGINT"));
Deno.addSignalListener("SIGTERM", () => shutdown("SIGTERM"));
