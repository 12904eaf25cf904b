// Renders only what the JSON API returns; text goes in with textContent.
(function () {
  const root = document.getElementById("gpushare-capacity");
  if (!root) return;
  const prefix = root.dataset.prefix;
  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  }
  async function refresh() {
    const [capacity, queue] = await Promise.all([
      fetch(prefix + "api/capacity").then((r) => r.json()),
      fetch(prefix + "api/queue").then((r) => r.json()),
    ]);
    root.replaceChildren();
    for (const pool of capacity.pools || []) {
      const row = el("div", undefined, "gpushare-pool");
      const bar = el("span", undefined, "gpushare-bar");
      const used = el("span");
      used.style.width = pool.slices_total ? (100 * pool.slices_used / pool.slices_total) + "%" : "0";
      bar.appendChild(used);
      row.appendChild(el("strong", pool.products.join(", ") || pool.key));
      row.appendChild(document.createTextNode(" "));
      row.appendChild(bar);
      row.appendChild(el("span", ` ${pool.slices_free} of ${pool.slices_total} slices free, ${pool.waiting} waiting`));
      root.appendChild(row);
    }
    for (const entry of queue.entries || []) {
      if (entry.state === "waiting") {
        root.appendChild(el("p", `Your place in line: ${entry.position} of ${entry.waiting}`));
      }
    }
  }
  refresh();
  setInterval(refresh, 5000);
})();
