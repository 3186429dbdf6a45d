// Requests through the proxy with a Node client; prints one JSON line of results.
// usage: node client.mjs undici|https-proxy-agent PROXY_URL CA_FILE|- URL...
import { readFileSync } from "node:fs";
import http from "node:http";
import https from "node:https";
import { HttpsProxyAgent } from "https-proxy-agent";
import { ProxyAgent, request } from "undici";

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

const results = [];
if (kind === "undici") {
  const dispatcher = new ProxyAgent({ uri: proxy, requestTls: { ca } });
  for (const url of urls) results.push(await viaUndici(url, dispatcher));
  await dispatcher.close();
} else {
  const agent = new HttpsProxyAgent(proxy, { ca });
  for (const url of urls) results.push(await viaAgent(url, agent));
  agent.destroy();
}
console.log(JSON.stringify(results));
