// The official `openai` npm package calling the function's Images API door; prints one JSON
// object with what each call gave, for tests/test_openai_door_node.py to check.
// Usage: node calls.mjs <base URL ending in /v1> <API key>
import OpenAI from "openai";

const [baseURL, apiKey] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 60_000 });
const wrong = new OpenAI({ baseURL, apiKey: "not-the-key-0123456789", maxRetries: 0 });
const out = {};

async function caught(name, call) {
  try {
    await call();
    out[name] = { raised: null };
  } catch (error) {
    out[name] = { raised: error.constructor.name, status: error.status, code: error.code ?? null, type: error.type ?? null,
                  retryAfter: error.headers?.get?.("retry-after") ?? null };
  }
}

const b64 = await client.images.generate({ prompt: "a red fox", size: "256x256" });
out.b64 = { count: b64.data.length, size: b64.size, format: b64.output_format, head: b64.data[0].b64_json.slice(0, 8) };

const many = await client.images.generate({ prompt: "foxes", n: 2, size: "256x256", output_format: "jpeg", seed: 5 });
out.many = { count: many.data.length, format: many.output_format, seeds: many.imagegen.images.map((image) => image.seed),
             head: many.data[0].b64_json.slice(0, 4) };

const linked = await client.images.generate({ prompt: "a linked fox", size: "256x256", response_format: "url" });
const fetched = await fetch(linked.data[0].url);
out.url = { status: fetched.status, type: fetched.headers.get("content-type"), bytes: (await fetched.arrayBuffer()).byteLength };

const models = [];
for await (const model of client.models.list()) models.push(model.id);
out.models = models;

await caught("badRequest", () => client.images.generate({ prompt: "x", model: "dall-e-9" }));
await caught("unauthorized", () => wrong.images.generate({ prompt: "x" }));

const stream = await client.images.generate({ model: "demo", prompt: "a streamed fox", size: "256x256", stream: true, partial_images: 2 });
const events = [];
for await (const event of stream) events.push({ type: event.type, index: event.partial_image_index ?? null, head: event.b64_json.slice(0, 4) });
out.stream = events;

// Last: it spends what is left of the rate limit the test gives this function.
await caught("tooMany", () => client.images.generate({ prompt: "x", n: 10, size: "256x256" }));

console.log(JSON.stringify(out));
