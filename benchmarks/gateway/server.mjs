// An OpenAI-compatible mock chat endpoint behind express-rate-limit (someone else's limiter):
// a fixed window of WINDOW_MS admitting LIMIT requests, the IETF draft's headers in the
// revision STD ("draft-6" | "draft-7" | "draft-8") or none ("none"), retry-after on a 429.
// Answers after LATENCY_MS. Prints "listening <port>" once up.
import express from "express";
import { rateLimit } from "express-rate-limit";

const env = process.env;
const std = env.STD || "draft-8";
const app = express();
app.use(express.json({ limit: "1mb" }));
app.use(rateLimit({
  windowMs: Number(env.WINDOW_MS || 1000),
  limit: Number(env.LIMIT || 5),
  standardHeaders: std === "none" ? false : std,
  legacyHeaders: false,
  message: { error: { message: "Too many requests (express-rate-limit)", type: "requests",
                      code: "rate_limit_exceeded" } },
}));
const latency = Number(env.LATENCY_MS || 200);
let served = 0;
app.post("/v1/chat/completions", (req, res) => {
  const messages = req.body.messages || [];
  const text = String((messages[messages.length - 1] || {}).content || "");
  served += 1;
  setTimeout(() => res.json({
    id: `chatcmpl-${served}`, object: "chat.completion", created: Math.floor(Date.now() / 1000),
    model: req.body.model || "mock",
    choices: [{ index: 0, finish_reason: "stop",
                message: { role: "assistant", content: text.split(/\s+/).slice(0, 3).join(" ") } }],
    usage: { prompt_tokens: Math.ceil(text.length / 4), completion_tokens: 3,
             total_tokens: Math.ceil(text.length / 4) + 3 },
  }), latency);
});
const server = app.listen(Number(env.PORT || 0), "127.0.0.1", () => {
  console.log(`listening ${server.address().port}`);
});
