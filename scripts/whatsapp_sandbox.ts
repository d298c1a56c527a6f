// The local WhatsApp sandbox: without Cloud API credentials, `npm start` runs
// the fake Cloud API from tests/support and points the functions at it, so a
// newcomer can watch a message go out and post signed sample webhooks. With
// WHATSAPP_ACCESS_TOKEN set nothing here runs and the real API is used.
import { startFakeWhatsApp } from "../tests/support/fake_whatsapp.ts";

export const SANDBOX = {
  WHATSAPP_APP_SECRET: "easymo-local-sandbox-app-secret",
  WHATSAPP_VERIFY_TOKEN: "easymo-local-sandbox-verify-token",
  WHATSAPP_ACCESS_TOKEN: "easymo-local-sandbox-access-token",
  WHATSAPP_PHONE_NUMBER_ID: "100000000000001",
};

/** Starts the sandbox unless real credentials are configured; returns the lines to print. */
export async function startWhatsAppSandbox(): Promise<
  { banner: string; close: () => Promise<void> } | null
> {
  if (Deno.env.get("WHATSAPP_ACCESS_TOKEN")) return null;
  const fake = await startFakeWhatsApp({
    port: Number(Deno.env.get("WHATSAPP_SANDBOX_PORT") ?? "54329"),
    token: SANDBOX.WHATSAPP_ACCESS_TOKEN,
    phoneNumberId: SANDBOX.WHATSAPP_PHONE_NUMBER_ID,
    log: true,
  });
  const vars = { ...SANDBOX, WHATSAPP_API_BASE_URL: fake.url };
  for (const [key, value] of Object.entries(vars)) {
    if (!Deno.env.get(key)) Deno.env.set(key, value);
  }
  return {
    banner: `WhatsApp sandbox: ${fake.url} (fake Cloud API; no credentials configured)
  sample webhook: node_modules/.bin/deno run -A scripts/whatsapp_sample.ts`,
    close: fake.close,
  };
}
