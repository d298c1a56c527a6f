// Routes /functions/v1/<name>/... to each function's Hono app the way
// Supabase's edge runtime does. The apps route on the path from /<name> on
// (shared/http.ts strips the /functions/v1 prefix), so requests pass as they are.
import { errorBody, HttpError } from "../shared/errors.ts";

type FetchApp = { fetch: (req: Request) => Response | Promise<Response> };

const FUNCTIONS_DIR = new URL("../supabase/functions/", import.meta.url);

/** Imports every supabase/functions/<name>/index.ts that exports `app`. */
export async function loadFunctions(): Promise<Map<string, FetchApp>> {
  const apps = new Map<string, FetchApp>();
  const names: string[] = [];
  for await (const entry of Deno.readDir(FUNCTIONS_DIR)) {
    if (entry.isDirectory && !entry.name.startsWith("_")) names.push(entry.name);
  }
  for (const name of names.sort()) {
    const mod = await import(new URL(`${name}/index.ts`, FUNCTIONS_DIR).href);
    if (mod.app && typeof mod.app.fetch === "function") apps.set(name, mod.app);
  }
  return apps;
}

// A Host header is a name or address and a port. Deno builds req.url from it
// unchecked, so "127.0.0.1:54321/functions/v1/queues" with a target of "/"
// would choose the function by a header instead of the request's path.
const HOST = /^[A-Za-z0-9.-]*(\[[0-9A-Fa-f:.]+\])?(:[0-9]{1,5})?$/;

/** A routing error in the functions' shape, readable by a browser as theirs are. */
function routingError(status: number, code: string, message: string): Response {
  const id = crypto.randomUUID();
  return Response.json(errorBody(new HttpError(status, code, message), id), {
    status,
    headers: {
      "x-correlation-id": id,
      "access-control-allow-origin": "*",
      "access-control-expose-headers": "x-correlation-id",
    },
  });
}

export function createRouter(apps: Map<string, FetchApp>): (req: Request) => Promise<Response> {
  return async (req) => {
    if (!HOST.test(req.headers.get("host") ?? "")) {
      return routingError(400, "invalid_host", "the Host header is not a host and port");
    }
    // The path as sent, as the apps read it: new URL() would resolve an
    // encoded dot segment (%2e%2e) and hand the request to another function,
    // whose routes could then match none of it.
    const path = req.url.replace(/^[a-z]+:\/\/[^/]*/i, "").replace(/[?#].*$/s, "");
    const match = /^\/functions\/v1\/([A-Za-z0-9_-]+)(\/.*)?$/.exec(path);
    const app = match ? apps.get(match[1]) : undefined;
    if (!match || !app) return routingError(404, "function_not_found", `no function at ${path}`);
    return await app.fetch(req);
  };
}
