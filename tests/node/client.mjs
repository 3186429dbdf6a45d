// Requests through the proxy with a Node client; prints one JSON line of results.
// usage: node client.mjs undici|https-proxy-agent|ws PROXY_URL CA_FILE|- URL...
// ws: one WebSocket per URL in turn (ws with https-proxy-agent, which CONNECTs even for ws://),
// "hello" sent and echoed, then closed by the client.
import { readFileSync } from "node:fs";
import http from "node:http";
import https from "node:https";
import { HttpsProxyAgent } from "https-proxy-agent";
import { ProxyAgent, request } from "undici";
import WebSocket from "ws";

const [kind, proxy, caFile, ...urls] = process.argv.slice(2);
const ca = caFile === "-" ? undefined : readFileSync(caFile);

async function viaUndici(url, dispatcher) {
  const { statusCode, body } = await request(url, { dispatcher });
  return { status: statusCode, body: await body.text() };
}

function viaAgent(url, agent) {
  const module = url.startsWith("https:") ? https : http;
  return new Promise((resolve, reject) => {
    module
      .get(url, { agent, ca }, (response) => {
        let body = "";
        response.setEncoding("utf8");
        response.on("data", (chunk) => (body += chunk));
        response.on("end", () => resolve({ status: response.statusCode, body }));
      })
      .on("error", reject);
  });
}

function viaWebSocket(url, agent) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { agent, ca });
    let echoed = null;
    ws.on("open", () => ws.send("hello"));
    ws.on("message", (data) => {
      echoed = data.toString();
      ws.close();
    });
    ws.on("close", (code) => resolve({ status: code, body: echoed }));
    ws.on("error", reject);
  });
}

const results = [];
if (kind === "undici") {
  const dispatcher = new ProxyAgent({ uri: proxy, requestTls: { ca } });
  for (const url of urls) results.push(await viaUndici(url, dispatcher));
  await dispatcher.close();
} else if (kind === "ws") {
  for (const url of urls) results.push(await viaWebSocket(url, new HttpsProxyAgent(proxy, { ca })));
} else {
  const agent = new HttpsProxyAgent(proxy, { ca });
  for (const url of urls) results.push(await viaAgent(url, agent));
  agent.destroy();
}
console.log(JSON.stringify(results));
