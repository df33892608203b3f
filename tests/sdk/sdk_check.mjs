// The real openai and ollama npm clients against a running moongate whose policy is
// tests/integration/test_llm.c's (alice-token is served, limited-token gets 429, anything else
// 401) and whose upstream is mg-upstream's fake Ollama and OpenAI-compatible server.
//
//   node sdk_check.mjs http://127.0.0.1:PORT
//
// Prints one line per check and "N passed, N failed"; exits 1 if any failed.
import OpenAI from "openai";
import { Ollama } from "ollama";

const base = process.argv[2];
let passed = 0, failed = 0;
function check(ok, what, got) {
  if (ok) {
    passed++;
    console.log(`ok   ${what}`);
  } else {
    failed++;
    console.log(`FAIL ${what}${got === undefined ? "" : `: got ${JSON.stringify(got)}`}`);
  }
}

async function thrown(fn) {
  try {
    await fn();
  } catch (e) {
    return e;
  }
  return null;
}

const ask = { model: "gpt-oss:20b", messages: [{ role: "user", content: "one two" }] };

// OpenAI: a refusal reads as the SDK's own error, with the gateway's message.
{
  const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: "wrong", maxRetries: 0 });
  const e = await thrown(() => client.chat.completions.create(ask));
  check(e instanceof OpenAI.AuthenticationError, "openai: 401 is an AuthenticationError",
        e && e.constructor.name);
  check(e?.status === 401, "openai: status 401", e?.status);
  check(e?.message === "401 bad or missing token", "openai: message", e?.message);
  check(e?.error?.message === "bad or missing token", "openai: e.error.message", e?.error);
  check(e?.code === "invalid_api_key", "openai: e.code", e?.code);
  check(e?.type === "authentication_error", "openai: e.type", e?.type);
  check(typeof e?.requestID === "string" && e.requestID.length > 0 &&
        e.requestID === e?.error?.request_id, "openai: request id", e?.requestID);
}
{
  const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: "limited-token", maxRetries: 0 });
  const e = await thrown(() => client.chat.completions.create(ask));
  check(e instanceof OpenAI.RateLimitError, "openai: 429 is a RateLimitError",
        e && e.constructor.name);
  check(e?.code === "rate_limit_exceeded" && e?.error?.message === "slow down",
        "openai: 429 code and message", e?.error);
  check(e?.headers?.get("retry-after") === "7", "openai: retry-after", e?.headers?.get("retry-after"));
}
// OpenAI: a stream with its usage, through the gateway's accounting.
{
  const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: "alice-token", maxRetries: 0 });
  const stream = await client.chat.completions.create({
    ...ask, stream: true, stream_options: { include_usage: true }, max_tokens: 3,
  });
  let text = "", usage = null;
  for await (const chunk of stream) {
    text += chunk.choices[0]?.delta?.content ?? "";
    if (chunk.usage) usage = chunk.usage;
  }
  check(text === "Hello from the", "openai: streamed text", text);
  check(usage?.prompt_tokens === 2 && usage?.completion_tokens === 3, "openai: usage", usage);
}
// Ollama: a refusal reads as its ResponseError.
{
  const client = new Ollama({ host: base, headers: { Authorization: "Bearer wrong" } });
  const e = await thrown(() => client.chat({ model: "llama3.1:8b", messages: ask.messages }));
  check(e?.name === "ResponseError", "ollama: a ResponseError", e?.name);
  check(e?.error === "bad or missing token", "ollama: e.error", e?.error);
  check(e?.status_code === 401, "ollama: status_code", e?.status_code);
}
// Ollama: a stream and its final record.
{
  const client = new Ollama({ host: base, headers: { Authorization: "Bearer alice-token" } });
  const parts = await client.chat({
    model: "llama3.1:8b", stream: true,
    messages: [{ role: "user", content: "a b c" }],
  });
  let text = "", last = null;
  for await (const part of parts) {
    text += part.message.content;
    last = part;
  }
  check(text === "Hello from the fake model", "ollama: streamed text", text);
  check(last?.done === true && last?.prompt_eval_count === 3 && last?.eval_count === 5,
        "ollama: the final record", last);
  const one = await client.generate({ model: "qwen2.5:7b", prompt: "x", stream: false });
  check(one.done === true && one.eval_count === 5 && one.response === "Hello from the fake model",
        "ollama: generate without a stream", one);
}

console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
