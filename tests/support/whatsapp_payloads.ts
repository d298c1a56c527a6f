// Cloud API webhook payloads shaped the way Meta sends them
// (object / entry[].changes[].value / field "messages"), for tests, the
// benchmark and the local sandbox's sample command.

export const BUSINESS = { display_phone_number: "15550783881", phone_number_id: "106540352242922" };

const seconds = () => String(Math.floor(Date.now() / 1000));

export function webhook(value: Record<string, unknown>, field = "messages") {
  return {
    object: "whatsapp_business_account",
    entry: [{
      id: "102290129340398",
      changes: [{ value: { messaging_product: "whatsapp", metadata: BUSINESS, ...value }, field }],
    }],
  };
}

export function wamid(): string {
  return "wamid.HBgM" + crypto.randomUUID().replaceAll("-", "").toUpperCase();
}

/** An inbound message from `waId` (digits) with its contact. */
export function inbound(waId: string, message: Record<string, unknown>, name = "Test User") {
  return webhook({
    contacts: [{ profile: { name }, wa_id: waId }],
    messages: [{ from: waId, id: wamid(), timestamp: seconds(), ...message }],
  });
}

export const textMessage = (body: string) => ({ type: "text", text: { body } });
export const buttonReply = (id: string, title: string) => ({
  type: "interactive",
  interactive: { type: "button_reply", button_reply: { id, title } },
});
export const listReply = (id: string, title: string) => ({
  type: "interactive",
  interactive: { type: "list_reply", list_reply: { id, title, description: "row description" } },
});
export const locationMessage = (latitude: number, longitude: number) => ({
  type: "location",
  location: {
    latitude,
    longitude,
    name: "Kigali Convention Centre",
    address: "KG 2 Roundabout, Kigali",
  },
});
export const imageMessage = (caption: string) => ({
  type: "image",
  image: { caption, mime_type: "image/jpeg", sha256: "aGVsbG8=", id: "1479537139650973" },
});

/** A status update for an outbound message. */
export function statusUpdate(
  id: string,
  status: "sent" | "delivered" | "read" | "failed",
  recipient: string,
  error?: { code: number; title: string },
) {
  const s: Record<string, unknown> = { id, status, timestamp: seconds(), recipient_id: recipient };
  if (status !== "failed" && status !== "read") {
    s.conversation = { id: "a75d17ad06104c51166f948319b03c6a", origin: { type: "service" } };
    s.pricing = { billable: true, pricing_model: "CBP", category: "service" };
  }
  if (error) {
    s.errors = [{
      code: error.code,
      title: error.title,
      message: error.title,
      error_data: { details: error.title },
      href: "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/",
    }];
  }
  return webhook({ statuses: [s] });
}

/** Errors Meta reports about the business number itself. */
export function errorsWebhook(code: number, title: string) {
  return webhook({
    errors: [{ code, title, message: title, error_data: { details: title } }],
  });
}

/** The wamid of the first inbound message of a payload built above. */
export function firstWamid(payload: unknown): string {
  const p = payload as { entry: { changes: { value: { messages: { id: string }[] } }[] }[] };
  return p.entry[0].changes[0].value.messages[0].id;
}
