// The live feed: GET /api/dashboard/events read as Server-Sent Events over fetch
// (so the bearer token can be sent), reconnecting with a growing pause.

import { authHeaders, parseExact } from "./api.js";

/**
 * Follow the feed: `onSnapshot(snapshot)` for each snapshot, `onStatus(kind, text)`
 * for the connection's state ("live", "wait", "idle"), `onRefused(status, message)`
 * when the token is refused (the feed then stops). Answers `{close()}`.
 */
export function follow({ onSnapshot, onStatus, onRefused }) {
  let controller = null;
  let retryMs = 1000;
  let retryTimer = null;
  let closed = false;

  function scheduleRetry() {
    clearTimeout(retryTimer);
    onStatus("wait", "Reconnecting…");
    retryTimer = setTimeout(connect, retryMs);
    retryMs = Math.min(retryMs * 2, 15000);
  }

  function handleBlock(block) {
    let event = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    }
    if (event === "snapshot" && data.length) onSnapshot(parseExact(data.join("\n")));
  }

  async function connect() {
    clearTimeout(retryTimer);
    if (controller) controller.abort();
    if (closed) return;
    const mine = new AbortController();
    controller = mine;
    onStatus("wait", "Connecting…");
    let res;
    try {
      res = await fetch("/api/dashboard/events", {
        headers: { ...authHeaders(), Accept: "text/event-stream" },
        cache: "no-store",
        signal: mine.signal,
      });
    } catch (err) {
      if (!mine.signal.aborted) scheduleRetry();
      return;
    }
    if (res.status === 401 || res.status === 403) {
      let message = res.status === 401 ? "The token is not known." : "This token may not read.";
      try {
        const body = await res.json();
        if (body && body.error) message = body.error.message;
      } catch (err) {
        // keep the generic message
      }
      closed = true;
      onRefused(res.status, message);
      return;
    }
    if (!res.ok || !res.body) {
      scheduleRetry();
      return;
    }
    retryMs = 1000;
    onStatus("live", "Live");
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          handleBlock(block);
        }
      }
    } catch (err) {
      // the connection dropped: reconnect below
    }
    if (!mine.signal.aborted) scheduleRetry();
  }

  connect();
  return {
    close() {
      closed = true;
      clearTimeout(retryTimer);
      if (controller) controller.abort();
    },
  };
}
