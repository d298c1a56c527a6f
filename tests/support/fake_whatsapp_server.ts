// The fake Cloud API in its own process (benchmarks), so its arrival times are
// not skewed by the event loop of the dispatchers it measures. Prints one JSON
// line {url, token, phone_number_id} and serves until killed.
import { startFakeWhatsApp } from "./fake_whatsapp.ts";

const fake = await startFakeWhatsApp({ latencyMs: Number(Deno.env.get("FAKE_LATENCY_MS") ?? "0") });
console.log(
  JSON.stringify({ url: fake.url, token: fake.token, phone_number_id: fake.phoneNumberId }),
);
