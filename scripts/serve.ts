// The local API: every function under /functions/v1/<name> on 127.0.0.1:54321,
// the scheduler, and the keys printed the way `supabase status` prints them.
import { closeDb } from "../shared/db.ts";
import { LOCAL_JWT_SECRET, signKey } from "./keys.ts";
import { createRouter, loadFunctions } from "./router.ts";
import { startScheduler } from "./scheduler.ts";
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

const secret = Deno.env.get("JWT_SECRET");
const anonKey = Deno.env.get("SUPABASE_ANON_KEY") ?? (secret ? await signKey("anon", secret) : "");
const serviceKey = Deno.env.get("SUPABASE_SERVICE_ROLE_KEY") ??
  (secret ? await signKey("service_role", secret) : "");
Deno.env.set("SUPABASE_ANON_KEY", anonKey);
Deno.env.set("SUPABASE_SERVICE_ROLE_KEY", serviceKey);

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

const whatsappSandbox = await startWhatsAppSandbox().catch((err) =>
  exitIfPortTaken(err, "the WhatsApp sandbox", "WHATSAPP_SANDBOX_PORT")
);
const apps = await loadFunctions();
const controller = new AbortController();
let server: Deno.HttpServer;
try {
  server = Deno.serve(
    { port, hostname: "127.0.0.1", signal: controller.signal, onListen: () => {} },
    createRouter(apps),
  );
} catch (err) {
  exitIfPortTaken(err, `the API on ${apiUrl}`, "API_PORT");
}

const redacted = dbUrl.replace(/\/\/([^:@/]+):[^@/]*@/, "//$1:***@");
console.log(`
EasyMO local stack is running.

         API URL: ${apiUrl}
   Functions URL: ${apiUrl}/functions/v1/{${[...apps.keys()].join(",")}}
          DB URL: ${redacted}
      JWT secret: ${secret === LOCAL_JWT_SECRET ? LOCAL_JWT_SECRET : "(from JWT_SECRET)"}
        anon key: ${anonKey}
service_role key: ${serviceKey}
${whatsappSandbox ? "\n" + whatsappSandbox.banner + "\n" : ""}
Press Ctrl-C to stop.
`);

const stopScheduler = Deno.env.get("SCHEDULER") === "off"
  ? () => {}
  : startScheduler(apiUrl, serviceKey);

let stopping = false;
async function shutdown(signal: string) {
  if (stopping) return;
  stopping = true;
  console.log(`\n${signal}: stopping the API`);
  stopScheduler();
  await whatsappSandbox?.close();
  controller.abort();
  await server.finished.catch(() => {});
  await closeDb();
  Deno.exit(0);
}
Deno.addSignalListener("SIGINT", () => shutdown("SIGINT"));
Deno.addSignalListener("SIGTERM", () => shutdown("SIGTERM"));
