// Posts a signed sample webhook (an inbound text from +250788123456) to the
// local stack, enqueues a reply and waits until the sandbox has sent it.
//
//   node_modules/.bin/deno run -A scripts/whatsapp_sample.ts [message text]
import { signWebhook } from "../shared/whatsapp.ts";
import { inbound, textMessage } from "../tests/support/whatsapp_payloads.ts";
import { LOCAL_JWT_SECRET, signKey } from "./keys.ts";
import { SANDBOX } from "./whatsapp_sandbox.ts";

const api = `${Deno.env.get("SUPABASE_URL") ?? "http://127.0.0.1:54321"}/functions/v1`;
const secret = Deno.env.get("WHATSAPP_APP_SECRET") ?? SANDBOX.WHATSAPP_APP_SECRET;
const serviceKey = Deno.env.get("SUPABASE_SERVICE_ROLE_KEY") ??
  await signKey("service_role", Deno.env.get("JWT_SECRET") ?? LOCAL_JWT_SECRET);
const from = "250788123456";

const body = JSON.stringify(
  inbound(from, textMessage(Deno.args.join(" ") || "Muraho! I need a moto to Kimironko")),
);
const hook = await fetch(`${api}/whatsapp-webhook`, {
  method: "POST",
  headers: { "content-type": "application/json", "x-hub-signature-256": signWebhook(body, secret) },
  body,
});
console.log(`POST /whatsapp-webhook -> ${hook.status} ${await hook.text()}`);

const headers = { authorization: `Bearer ${serviceKey}`, "content-type": "application/json" };
const enqueued = await fetch(`${api}/whatsapp/messages`, {
  method: "POST",
  headers,
  body: JSON.stringify({
    recipient_phone: `+${from}`,
    message_type: "text",
    message_payload: { text: "Murakoze! A driver is on the way." },
  }),
});
const message = await enqueued.json();
console.log(
  `POST /whatsapp/messages -> ${enqueued.status} id=${message.id} status=${message.status}`,
);

for (let i = 0; i < 50 && message.id; i++) {
  const res = await fetch(`${api}/whatsapp/messages/${message.id}`, { headers });
  const now = await res.json();
  if (now.status !== "pending" && now.status !== "processing") {
    console.log(`message ${now.id}: ${now.status} ${now.wamid ?? now.error_code ?? ""}`);
    break;
  }
  await new Promise((r) => setTimeout(r, 200));
}
