// The gpushare pages. They show only what the service's JSON API returns
// (api/capacity, api/queue, api/nodes, api/activity, api/reclaims), and every value goes into
// the page as text (textContent, text nodes, attributes set one by one), never
// as markup: user and server names are whatever the authenticator allowed.
(function () {
  "use strict";

  const root = document.getElementById("gpushare");
  if (!root) return;
  const prefix = root.dataset.prefix;
  const mode = root.dataset.mode; // "user", "admin" or "embedded" (the admin page's iframe)
  const xsrf = root.dataset.xsrf;
  const status = root.querySelector(".gs-status");
  const content = root.querySelector(".gs-content");
  const POLL_MS = 2000;
  const MAX_BACKOFF_MS = 30000;
  const embedded = mode === "embedded" && window.parent !== window;

  // -- building elements --------------------------------------------------------
  function h(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "style") node.style.cssText = value;
      else node.setAttribute(key, String(value));
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null || child === false) continue;
      node.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  // -- the API --------------------------------------------------------------------
  class APIError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(path) {
    const response = await fetch(prefix + "api/" + path, {
      // The hub's OAuth cookie counts for fetch() only together with this token.
      headers: { "X-XSRFToken": xsrf, Accept: "application/json" },
      credentials: "same-origin",
      cache: "no-store",
    });
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;
    }
    if (!response.ok) {
      throw new APIError(response.status, (body && body.message) || response.statusText);
    }
    return body;
  }

  // -- words and numbers ------------------------------------------------------------
  function plural(n, one, many) {
    return n + " " + (n === 1 ? one : many || one + "s");
  }

  function duration(seconds) {
    if (!Number.isFinite(seconds)) return "unknown";
    seconds = Math.max(0, Math.round(seconds));
    if (seconds < 60) return seconds + " s";
    const minutes = Math.floor(seconds / 60);
    if (minutes < 60) return minutes + " min";
    const hours = Math.floor(minutes / 60);
    if (hours < 48) return hours + " h " + (minutes % 60) + " min";
    return Math.floor(hours / 24) + " d " + (hours % 24) + " h";
  }

  // "about 4 minutes, at most 20": the estimate rounded, the bound (a promise)
  // rounded up; both are Unix times in the API, counted from the service's now
  function estimate(entry, now) {
    const until = (t) => (typeof t === "number" && Number.isFinite(t) ? Math.max(t - now, 0) : null);
    const eta = until(entry.eta_at);
    const bound = until(entry.eta_bound_at);
    if (eta === null && bound === null) return "unknown";
    const parts = [];
    if (eta !== null) {
      if (eta < 90) parts.push("about a minute");
      else if (eta < 3600) parts.push("about " + Math.round(eta / 60) + " minutes");
      else parts.push("about " + (eta / 3600).toFixed(1) + " hours");
    }
    if (bound !== null) {
      const minutes = Math.max(Math.ceil(bound / 60), 1);
      if (minutes >= 120) parts.push("at most " + (Math.ceil(bound / 360) / 10).toFixed(1) + " hours");
      else if (eta !== null && eta >= 90 && eta < 3600) parts.push("at most " + minutes);
      else parts.push("at most " + plural(minutes, "minute"));
    }
    return parts.join(", ");
  }

  // what reclaim makes of one GPU server: how long it has been idle, and when it
  // would be stopped for someone waiting
  function reclaimText(holding, settings, now) {
    const idle = Number.isFinite(holding.idle_seconds) ? "idle " + duration(holding.idle_seconds) : "idle: unknown";
    if (!settings || !settings.enabled) return idle;
    const verb = settings.dry_run ? "would be reclaimed" : "reclaimed";
    if (holding.exempt) return idle + " · never reclaimed (" + holding.exempt + ")";
    if (holding.stopping) return idle + " · stopping";
    if (holding.reclaim_now) return idle + " · " + (settings.dry_run ? "would be reclaimed now (dry run)" : "being reclaimed now");
    const at = holding.reclaim_at;
    if (typeof at !== "number" || !Number.isFinite(at)) return idle;
    const waiting = holding.waiting || 0;
    if (at <= now) return idle + " · " + verb + " as soon as someone waits for its slice";
    return idle + " · " + verb + " in " + duration(at - now) + (waiting ? " if someone still waits" : " if someone waits by then");
  }

  // ISO 8601 (pods, the hub) or Unix seconds (the queue) to Unix seconds
  function unixTime(value) {
    if (value === null || value === undefined || value === "") return NaN;
    if (typeof value === "number") return value;
    const ms = Date.parse(value);
    return Number.isFinite(ms) ? ms / 1000 : NaN;
  }

  // "5 min ago", with the exact local time as a tooltip
  function ago(value, now) {
    const t = unixTime(value);
    if (!Number.isFinite(t)) return h("span", { class: "gs-muted" }, "unknown");
    const text = now - t < 5 ? "just now" : duration(now - t) + " ago";
    return h("time", { datetime: new Date(t * 1000).toISOString(), title: new Date(t * 1000).toLocaleString() }, text);
  }

  // How a node shares its GPUs decides what holds a user to their share.
  const CAPS = {
    mps: ["hard cap (MPS)", "Each server at most 1/N of the GPU's memory and compute, enforced by the driver."],
    "time-slicing": ["cooperative cap", "Frameworks keep to 1/N of the memory; a user alone gets all of the GPU's compute."],
    none: ["whole GPU", "Not shared: one server per GPU."],
  };
  function capOf(strategies) {
    const known = (strategies || []).filter((s) => Object.prototype.hasOwnProperty.call(CAPS, s));
    // nodes that disagree: say the weaker of what holds
    const kind = known.length === 1 ? known[0] : known.includes("time-slicing") || !known.length ? "time-slicing" : known[0];
    return CAPS[kind];
  }
  function capLabel(strategies) {
    const [label, explanation] = capOf(strategies);
    return h("span", { class: "gs-cap", "data-gs": "cap", title: explanation }, label);
  }

  function productName(product) {
    return String(product || "").replace(/-SHARED$/, "").replace(/-/g, " ") || "unknown GPU";
  }

  function poolLabel(pool) {
    const products = (pool.products || []).map(productName);
    const parts = [products.length ? products.join(", ") : "no GPU nodes"];
    const selector = Object.entries(pool.selector || {}).filter(
      ([key]) => key !== "nvidia.com/gpu.product"
    );
    if (selector.length) parts.push(selector.map(([k, v]) => k + "=" + v).join(", "));
    if (pool.resource && pool.resource !== "nvidia.com/gpu") parts.push(pool.resource);
    if (!selector.length && !(pool.selector && pool.selector["nvidia.com/gpu.product"])) {
      parts[0] = "Any GPU (" + parts[0] + ")";
    }
    return parts.join(" · ");
  }

  function serverName(server) {
    return server ? server : "default";
  }

  // -- pieces ------------------------------------------------------------------------
  // One box per slice when they fit, else a filled bar; the numbers are in the label.
  function sliceBar(used, total, small) {
    used = Math.max(0, Math.min(used, total));
    const label = used + " of " + total + " slices in use";
    const bar = h("div", { class: "gs-bar" + (small ? " gs-bar-small" : ""), role: "img", "aria-label": label, title: label });
    if (total > 0 && total <= 32 && !small) {
      bar.classList.add("gs-bar-slices");
      for (let i = 0; i < total; i++) bar.appendChild(h("span", { class: i < used ? "gs-used" : "gs-free" }));
    } else {
      const fill = h("span", { class: "gs-fill" });
      fill.style.width = total > 0 ? (100 * used) / total + "%" : "0";
      bar.appendChild(fill);
    }
    return bar;
  }

  function metric(key, label, value) {
    return h("div", { class: "gs-metric", "data-gs": key }, h("span", { class: "gs-metric-value" }, value), h("span", { class: "gs-metric-label" }, label));
  }

  function table(columns, rows, cls) {
    return h(
      "table",
      { class: "gs-table " + (cls || "") },
      h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, rows)
    );
  }

  // -- the user's view -------------------------------------------------------------
  function renderUser(capacity, queue) {
    const pools = capacity.pools || [];
    const now = Number.isFinite(queue.now) ? queue.now : Date.now() / 1000;
    const mine = (queue.entries || []).filter((e) => e.state === "waiting");
    const starting = (queue.entries || []).filter((e) => e.state === "admitted");
    const settings = queue.reclaim || {};
    const parts = [];

    const holding = queue.holding || [];
    if (holding.length) {
      parts.push(h("h2", {}, "Your GPU servers"));
      for (const server of holding) {
        const lines = [
          h("span", {}, "Server: " + serverName(server.server) + " · " + plural(server.slices, "slice") + " · " + reclaimText(server, settings, now)),
        ];
        if (settings.enabled && !server.exempt && !settings.dry_run) {
          const waiting = server.waiting || 0;
          lines.push(
            h(
              "span",
              { class: "gs-muted" },
              (waiting ? plural(waiting, "person is", "people are") + " waiting for a GPU slice now. " : "") +
                "A GPU server idle for " + duration(settings.idle_seconds) + " is stopped when someone waits for its slice; your files are kept."
            )
          );
        }
        parts.push(h("div", { class: "gs-place", "data-gs": "my-server", "data-server": server.server }, h("span", { class: "gs-place-text" }, lines)));
      }
    }
    for (const record of queue.reclaims || []) {
      if (record.outcome !== "stopped" && record.outcome !== "stopping") continue;
      parts.push(
        h(
          "p",
          { class: "gs-warning", "data-gs": "my-reclaim" },
          "Your " + (record.server ? "server " + record.server : "server") + " was stopped " + duration(now - record.at) + " ago to free its GPU slice: " +
            (record.reason === "max-hold" ? "it had held the slice for " + duration(record.held_seconds || 0) : "it had been idle for " + duration(record.idle_seconds)) +
            " while " + plural(record.waiting, "person", "people") + " waited. Your files are kept."
        )
      );
    }

    parts.push(h("h2", {}, "Your place in line"));
    if (mine.length) {
      for (const entry of mine) {
        parts.push(
          h(
            "div",
            { class: "gs-place", "data-gs": "my-place" },
            h("span", { class: "gs-place-number" }, entry.position),
            h(
              "span",
              { class: "gs-place-text" },
              h("span", {}, "of " + entry.waiting + " in line for " + poolLabel(entry.pool || {})),
              h("span", { class: "gs-muted", "data-gs": "my-wait" }, "Server: " + serverName(entry.server) + " · estimated wait: " + estimate(entry, now))
            )
          )
        );
      }
    } else if (starting.length) {
      parts.push(h("p", { "data-gs": "my-place" }, "A slice is yours: your server is starting."));
    } else {
      parts.push(h("p", { class: "gs-muted", "data-gs": "my-place" }, "You are not waiting for a GPU slice."));
    }

    parts.push(h("h2", {}, "Free slices"));
    if (!pools.length) {
      parts.push(h("p", { class: "gs-muted" }, capacity.ready ? "No GPU nodes." : "Reading the cluster…"));
    } else {
      const rows = pools.map((pool) =>
        h(
          "tr",
          { "data-pool": pool.key },
          h("td", {}, poolLabel(pool)),
          h("td", {}, sliceBar(pool.slices_used, pool.slices_total, true)),
          h("td", { class: "gs-num", "data-gs": "pool-free" }, pool.slices_free + " of " + pool.slices_total + " free"),
          h("td", { class: "gs-num", "data-gs": "pool-waiting" }, pool.waiting + " waiting"),
          h("td", {}, capLabel(pool.sharing))
        )
      );
      parts.push(table(["GPUs", "In use", "Free", "In line", "Memory"], rows, "gs-pools"));
    }
    if (capacity.ready === false && capacity.problem) {
      parts.push(h("p", { class: "gs-warning" }, "Still reading the cluster: " + capacity.problem));
    }
    return parts;
  }

  // -- the admins' panel -------------------------------------------------------------
  function renderPanel(capacity, queue, nodes, activity, reclaims) {
    // durations against the service's clock, not the browser's
    const now = Number.isFinite(activity.now) ? activity.now : Date.now() / 1000;
    // a Map, so that no user name can reach the prototype of a plain object
    const known = new Map(Object.entries(activity.users || {}));
    const nodeList = nodes.nodes || [];
    const entries = queue.entries || [];
    const waiting = entries.filter((e) => e.state === "waiting");
    const starting = entries.filter((e) => e.state === "admitted");
    const sum = (key) => nodeList.reduce((acc, n) => acc + (Number(n[key]) || 0), 0);
    const settings = nodes.reclaim || {};
    const parts = [];

    parts.push(
      h(
        "div",
        { class: "gs-totals" },
        metric("nodes", "GPU nodes", nodeList.length),
        metric("gpus", "physical GPUs", sum("gpus")),
        metric("slices", "slices", sum("slices_total")),
        metric("used", "in use", sum("slices_used")),
        metric("free", "free", sum("slices_free")),
        metric("waiting", "waiting", waiting.length)
      )
    );
    const notes = ["Updated " + new Date().toLocaleTimeString()];
    if (!activity.available) notes.push("user activity unavailable" + (activity.problem ? ": " + activity.problem : ""));
    if (capacity.ready === false) notes.push("still reading the cluster" + (capacity.problem ? ": " + capacity.problem : ""));
    notes.push("reclaim of idle GPU servers: " + (settings.description || "off"));
    parts.push(h("p", { class: "gs-muted gs-updated" }, notes.join(" · ")));

    parts.push(h("h2", {}, "Nodes"));
    if (!nodeList.length) parts.push(h("p", { class: "gs-muted" }, "No GPU nodes."));
    for (const node of nodeList) {
      const memory = node.memory_mib ? Math.round(node.memory_mib / 1024) + " GiB per GPU" : null;
      const facts = [
        productName(node.product),
        (node.gpus || "?") + " GPU" + (node.gpus === 1 ? "" : "s") + " × " + node.replicas + " replica" + (node.replicas === 1 ? "" : "s") + " = " + plural(node.slices_total, "slice"),
        memory,
        node.resource !== "nvidia.com/gpu" ? node.resource : null,
      ].filter(Boolean);
      const booked = Number(node.slices_booked) || 0;
      const usage =
        node.slices_used + " of " + node.slices_total + " in use · " +
        (booked ? booked + " booked for starting servers · " : "") + node.slices_free + " free";
      const holders = (node.holders || []).map((holder) => {
        const isHub = holder.user !== null && holder.user !== undefined;
        const seen = isHub ? known.get(holder.user) : undefined;
        let last;
        if (seen) {
          const servers = new Map(Object.entries(seen.servers || {}));
          last = servers.get(holder.server || "") || seen.last_activity;
        }
        return h(
          "tr",
          { "data-holder": isHub ? holder.user : holder.namespace + "/" + holder.pod },
          h("td", { class: "gs-user" }, isHub ? holder.user : h("span", { class: "gs-muted" }, "not a hub user")),
          h("td", {}, isHub ? serverName(holder.server) : holder.namespace + "/" + holder.pod),
          h("td", { class: "gs-num" }, holder.slices),
          h("td", {}, ago(holder.since, now)),
          h("td", {}, isHub ? ago(last, now) : h("span", { class: "gs-muted" }, "—")),
          settings.enabled
            ? h("td", { "data-gs": "reclaim" }, isHub && holder.idle_seconds !== undefined ? reclaimText(holder, settings, now) : h("span", { class: "gs-muted" }, "never (not a hub server)"))
            : null
        );
      });
      const columns = ["User", "Server", "Slices", "Since", "Last activity"];
      if (settings.enabled) columns.push("Reclaim");
      parts.push(
        h(
          "article",
          { class: "gs-node", "data-node": node.name },
          h(
            "div",
            { class: "gs-node-head" },
            h("strong", { class: "gs-node-name" }, node.name),
            h("span", { class: "gs-node-facts" }, facts.join(" · ")),
            capLabel([node.strategy]),
            node.schedulable ? null : h("span", { class: "gs-badge gs-badge-warn" }, "not schedulable")
          ),
          h(
            "div",
            { class: "gs-node-bar" },
            sliceBar(node.slices_used, node.slices_total, false),
            h("span", { class: "gs-bar-label", "data-gs": "node-usage" }, usage)
          ),
          holders.length
            ? table(columns, holders, "gs-holders")
            : h("p", { class: "gs-muted" }, "No one holds a slice.")
        )
      );
    }

    parts.push(h("h2", {}, "Waiting"));
    if (!waiting.length && !starting.length) parts.push(h("p", { class: "gs-muted", "data-gs": "nobody-waits" }, "Nobody is waiting."));
    const pools = new Map();
    for (const entry of [...waiting, ...starting]) {
      const key = (entry.pool && entry.pool.key) || "?";
      if (!pools.has(key)) pools.set(key, { pool: entry.pool || {}, entries: [] });
      pools.get(key).entries.push(entry);
    }
    for (const [key, group] of pools) {
      const pool = group.pool;
      group.entries.sort((a, b) => (a.state === b.state ? (a.position || 0) - (b.position || 0) : a.state === "waiting" ? -1 : 1));
      const rows = group.entries.map((entry) =>
        h(
          "tr",
          { "data-entry": entry.user, "data-state": entry.state },
          h("td", { class: "gs-num gs-pos" }, entry.state === "waiting" ? entry.position : "starting"),
          h("td", { class: "gs-user" }, entry.user),
          h("td", {}, serverName(entry.server)),
          h("td", { class: "gs-num" }, entry.slices),
          h("td", {}, duration(now - unixTime(entry.requested_at))),
          h("td", {}, entry.state === "waiting" ? estimate(entry, now) : "on " + (entry.node || "a node"))
        )
      );
      const inLine = group.entries.filter((e) => e.state === "waiting").length;
      parts.push(
        h(
          "section",
          { class: "gs-queue", "data-pool": key },
          h(
            "h3",
            {},
            poolLabel(pool),
            h("span", { class: "gs-muted gs-queue-summary" }, " · " + inLine + " waiting · " + pool.slices_free + " of " + pool.slices_total + " slices free")
          ),
          table(["#", "User", "Server", "Slices", "Waiting for", "Estimated wait"], rows, "gs-waiting")
        )
      );
    }

    const recent = (reclaims && reclaims.reclaims) || [];
    if (settings.enabled || recent.length) {
      parts.push(h("h2", {}, "Recent reclaims"));
      if (!recent.length) parts.push(h("p", { class: "gs-muted", "data-gs": "no-reclaims" }, "No server has been reclaimed."));
      else {
        const rows = recent.slice(0, 20).map((r) =>
          h(
            "tr",
            { "data-reclaim": r.user, "data-outcome": r.outcome },
            h("td", {}, ago(r.at, now)),
            h("td", { class: "gs-user" }, r.user),
            h("td", {}, serverName(r.server)),
            h("td", {}, duration(r.idle_seconds)),
            h("td", { class: "gs-num" }, r.waiting),
            h("td", {}, r.reason === "max-hold" ? "held " + duration(r.held_seconds || 0) : "idle"),
            h("td", {}, r.outcome + (r.detail ? " (" + r.detail + ")" : ""))
          )
        );
        parts.push(table(["When", "User", "Server", "Idle for", "Waiting", "Why", "What happened"], rows, "gs-reclaims"));
      }
    }
    return parts;
  }

  // -- refreshing ----------------------------------------------------------------------
  let failures = 0;
  let timer = null;

  async function load() {
    if (mode === "user") {
      const [capacity, queue] = await Promise.all([api("capacity"), api("queue")]);
      return renderUser(capacity, queue);
    }
    const [capacity, queue, nodes, activity, reclaims] = await Promise.all([
      api("capacity"),
      api("queue"),
      api("nodes"),
      api("activity"),
      api("reclaims"),
    ]);
    return renderPanel(capacity, queue, nodes, activity, reclaims);
  }

  async function refresh() {
    timer = null;
    try {
      const parts = await load();
      content.replaceChildren(...parts);
      status.textContent = "";
      status.hidden = true;
      root.dataset.loaded = "true";
      failures = 0;
    } catch (error) {
      status.hidden = false;
      if (error instanceof APIError && (error.status === 401 || error.status === 403)) {
        if (reauthenticate()) return;
        // Not (or no longer) allowed: show nothing of the data and stop asking.
        content.replaceChildren();
        root.dataset.loaded = "refused";
        status.textContent = mode === "user" ? "Please log in to JupyterHub again." : "Only JupyterHub admins may see this panel.";
        announce();
        return;
      }
      failures += 1;
      status.textContent = "Could not refresh (" + (error.message || error) + "); trying again.";
    }
    announce();
    schedule();
  }

  // The service's login cookie goes stale when the service restarts (it signs
  // cookies with a new secret each time). Loading the page again goes through
  // the hub's OAuth and gets a fresh one; if that does not help within a
  // minute, the refusal is real.
  function reauthenticate() {
    const key = "gpushare-reauthenticated:" + window.location.pathname;
    try {
      const last = Number(window.sessionStorage.getItem(key)) || 0;
      if (Date.now() - last < 60000) return false;
      window.sessionStorage.setItem(key, String(Date.now()));
    } catch (e) {
      return false;
    }
    window.location.reload();
    return true;
  }

  function schedule() {
    if (timer !== null) return;
    // back off while the service does not answer, and rest in hidden tabs
    const delay = Math.min(POLL_MS * 2 ** failures, MAX_BACKOFF_MS);
    timer = setTimeout(document.hidden ? waitVisible : refresh, delay);
  }

  function waitVisible() {
    timer = null;
    if (!document.hidden) refresh();
    else document.addEventListener("visibilitychange", () => schedule(), { once: true });
  }

  // -- inside the admin page's iframe ---------------------------------------------------
  // The admin page sizes the iframe to the panel and shows it once it speaks.
  function announce() {
    if (!embedded) return;
    const style = getComputedStyle(document.body);
    const height = root.offsetHeight + parseFloat(style.marginTop) + parseFloat(style.marginBottom) + 2;
    window.parent.postMessage({ gpushare: "size", height: height }, window.location.origin);
  }

  if (embedded) {
    new ResizeObserver(announce).observe(root);
    window.addEventListener("message", (event) => {
      if (event.origin !== window.location.origin || event.source !== window.parent) return;
      const data = event.data || {};
      if (data.gpushare === "theme") {
        document.documentElement.dataset.theme = data.theme === "dark" ? "dark" : "light";
      }
    });
    announce();
  }

  refresh();
})();
