// The operator page: asks for the API token, keeps it in this closure only (never in
// storage, cookies or the URL), and shows /api/v1/operator/status. Text goes in with
// textContent only, never as HTML.
"use strict";
(() => {
  let token = null;
  let timer = null;
  const $ = (id) => document.getElementById(id);

  function age(seconds) {
    if (seconds === null || seconds === undefined) return "-";
    if (seconds < 120) return seconds.toFixed(1) + " s";
    if (seconds < 7200) return (seconds / 60).toFixed(1) + " min";
    return (seconds / 3600).toFixed(1) + " h";
  }

  function table(id, headers, rows, classOf) {
    const el = $(id);
    el.replaceChildren();
    const head = el.insertRow();
    for (const h of headers) {
      const th = document.createElement("th");
      th.textContent = h;
      head.appendChild(th);
    }
    rows.forEach((row, i) => {
      const tr = el.insertRow();
      const cls = classOf ? classOf(i) : "";
      if (cls) tr.className = cls;
      for (const cell of row) tr.insertCell().textContent = String(cell);
    });
  }

  function render(facts) {
    $("generated").textContent = "as of " + facts.generated_at;
    const accounts = Object.entries(facts.accounts);
    table("accounts", ["status", "accounts"], accounts, (i) => {
      const [status, n] = accounts[i];
      return n > 0 && status !== "connected" && status !== "backfilling" ? "warn" : "";
    });
    const subs = facts.subscriptions;
    $("subs-summary").textContent =
      subs.total + " recorded, " + subs.expiring_24h + " expiring within 24 h, " + subs.expired + " expired";
    table("expiring", ["account", "expires at", "in"],
      subs.expiring.map((s) => [s.account_id, s.expires_at, age(s.in_s)]));
    $("expiring").hidden = subs.expiring.length === 0;
    const dead = facts.dead_letters;
    $("dead").textContent = dead.count + " dead letters (oldest " + age(dead.oldest_age_s) + ")";
    $("dead").className = dead.count > 0 ? "bad" : "";
    const lag = Object.entries(facts.lag);
    table("lag", ["role", "processes", "p99 (5 min)", "samples"],
      lag.map(([role, v]) => [role, v.processes, age(v.lag_p99_s), v.samples]));
    const queues = facts.queues.filter((q) => q.exists);
    table("queues", ["queue", "waiting", "held", "consumers", "oldest"],
      queues.map((q) => [q.queue, q.ready, q.held, q.consumers, age(q.oldest_age_s)]),
      (i) => {
        const q = queues[i];
        if (q.queue.endsWith("dead-letters") && q.ready > 0) return "bad";
        return q.ready + q.held > 0 && q.consumers === 0 && /\.\d+$|intake|lifecycle/.test(q.queue) ? "warn" : "";
      });
  }

  function signOut(message) {
    token = null;
    if (timer !== null) clearInterval(timer);
    timer = null;
    $("facts").hidden = true;
    $("signout").hidden = true;
    $("signin").hidden = false;
    $("generated").textContent = "";
    $("error").textContent = message || "";
  }

  async function refresh() {
    if (token === null) return;
    let resp;
    try {
      resp = await fetch("/api/v1/operator/status", {
        headers: { Authorization: "Bearer " + token },
        cache: "no-store",
        credentials: "omit",
        referrerPolicy: "no-referrer",
      });
    } catch (e) {
      $("generated").textContent = "service not reachable; retrying";
      return;
    }
    if (resp.status === 401) {
      signOut("That token was not accepted.");
      return;
    }
    if (!resp.ok) {
      $("generated").textContent = "status failed (" + resp.status + "); retrying";
      return;
    }
    render(await resp.json());
    $("signin").hidden = true;
    $("facts").hidden = false;
    $("signout").hidden = false;
    $("error").textContent = "";
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("signin").addEventListener("submit", (event) => {
      event.preventDefault();
      const input = $("token");
      token = input.value.trim();
      input.value = "";
      if (!token) return;
      refresh();
      timer = setInterval(refresh, 10000);
    });
    $("signout").addEventListener("click", () => signOut(""));
  });
})();
