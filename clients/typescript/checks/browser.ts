// Compiled by tsconfig.browser.json (npm run typecheck) only: the browser's own WebSocket class fits the option.
import { GatewayClient } from "../src/index.js";

export const browserClient = new GatewayClient({
  url: "wss://gateway.example.com",
  token: async () => (await fetch("/api/gateway-token")).text(),
  userType: "rider",
  deviceId: "web-1",
  platform: "web",
  WebSocket: WebSocket,
});
