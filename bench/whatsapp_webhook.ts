// Webhook ingest: signed Cloud API POSTs per second through the real
// whatsapp-webhook function (signature check, parse, one SQL call storing the
// message once and updating the session) vs. a bare Hono handler that reads
// the same bodies and answers 200, served and driven the same way in the same
// run. Ratio = ours / peer.
import { Hono } from "hono";
import { closeDb } from "../shared/db.ts";
import { resetEnv } from "../shared/env.ts";
import { resetWhatsappConfig, signWebhook } from "../shared/whatsapp.ts";
import { inbound, textMessage } from "../tests/support/whatsapp_payloads.ts";
import { BENCH_DB, BENCH_SECRET } from "./lib.ts";

const SECRET = "bench-app-secret-0123456789abcdef";
for (
  const [k, v] of Object.entries({
    SUPABASE_DB_URL: BENCH_DB,
    JWT_SECRET: BENCH_SECRET,
    LOG_LEVEL: "silent",
    DB_POOL_SIZE: "8",
    WHATSAPP_APP_SECRET: SECRET,
  })
) Deno.env.set(k, v);
// no access token: ingest only, no dispatcher behind it
Deno.env.delete("WHATSAPP_ACCESS_TOKEN");
resetEnv();
resetWhatsappConfig();
const { app } = await import("../supabase/functions/whatsapp-webhook/index.ts");

const bare = new Hono();
bare.post("/whatsapp-webhook", async (c) => {
  await c.req.arrayBuffer();
  return c.json({ received: true });
});

const CONCURRENCY = 32;
const SECONDS = 5;

function serve(fetch: (req: Request) => Response | Promise<Response>) {
  const controller = new AbortController();
  let port = 0;
  const server = Deno.serve({
    port: 0,
    hostname: "127.0.0.1",
    signal: controller.signal,
    onListen: (a) => port = a.port,
  }, fetch);
  return {
    url: () => `http://127.0.0.1:${port}/whatsapp-webhook`,
    close: async () => {
      controller.abort();
      await server.finished;
    },
  };
}

/** Signed POSTs of distinct inbound messages from CONCURRENCY clients for SECONDS. */
async function drive(target: string): Promise<number> {
  // bodies are signed up front so the client side costs the same for both
  const bodies = Array.from({ length: 20_000 }, (_, i) => {
    const body = JSON.stringify(
      inbound("2507" + String(10_000_000 + (i % 500)).padStart(8, "0"), textMessage(`bench ${i}`)),
    );
    return { body, signature: signWebhook(body, SECRET) };
  });
  let next = 0;
  let ok = 0;
  const stop = performance.now() + SECONDS * 1000;
  const worker = async () => {
    while (performance.now() < stop) {
      const b = bodies[next++ % bodies.length];
      const res = await fetch(target, {
        method: "POST",
        headers: { "content-type": "application/json", "x-hub-signature-256": b.signature },
        body: b.body,
      });
      await res.arrayBuffer();
      if (res.status === 200) ok++;
      else throw new Error(`HTTP ${res.status}`);
    }
  };
  const started = performance.now();
  await Promise.all(Array.from({ length: CONCURRENCY }, worker));
  return ok / ((performance.now() - started) / 1000);
}

const oursServer = serve(app.fetch);
await drive(oursServer.url()); // warm-up (connections, JIT, partitions)
const ours = await drive(oursServer.url());
await oursServer.close();

const peerServer = serve(bare.fetch);
await drive(peerServer.url());
const peer = await drive(peerServer.url());
await peerServer.close();

console.log(
  `whatsapp webhook ingest, ${CONCURRENCY} concurrent clients, ${SECONDS} s, distinct signed inbound messages:\n` +
    `  ours: ${
      ours.toFixed(0)
    } signed POSTs/s (verify signature, parse, store once, update session)\n` +
    `  peer: ${peer.toFixed(0)} POSTs/s (bare Hono handler reading the body)\n` +
    `  ratio ours/peer: ${(ours / peer).toFixed(3)}`,
);
await closeDb();
