// Runs one dispatcher in its own process (the kill test SIGKILLs it mid-batch).
// Configuration comes from the environment: SUPABASE_DB_URL, JWT_SECRET, WHATSAPP_*.
import { dispatch } from "../../shared/whatsapp_dispatch.ts";

console.log("ready");
const report = await dispatch({ dispatcherId: Deno.args[0] ?? "subprocess" });
console.log(JSON.stringify(report));
Deno.exit(0);
