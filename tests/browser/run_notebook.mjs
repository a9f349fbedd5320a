// Open a notebook in JupyterLab with headless chromium, run all cells, wait for the dfbatch
// dashboard to finish, take a screenshot, and print what the page shows as one JSON line.
//
// node run_notebook.mjs --url http://127.0.0.1:8888 --token TOKEN --notebook run.ipynb \
//   --screenshot /tmp/shot.png [--timeout 180] [--chromium /usr/bin/chromium] [--width 1280]
//   [--stop-at 20]   (click the first dashboard's Stop button once its bar shows >= 20%)
//
// JupyterLab must run with --LabApp.expose_app_in_browser=True (window.jupyterapp).
import { chromium } from "playwright-core";

function args() {
  const out = { timeout: "180", chromium: process.env.CHROMIUM || "/usr/bin/chromium",
                width: "1280", "stop-at": "" };
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i += 2) out[argv[i].replace(/^--/, "")] = argv[i + 1];
  for (const k of ["url", "token", "notebook", "screenshot"]) {
    if (!out[k]) throw new Error(`missing --${k}`);
  }
  return out;
}

const CHROMIUM_ARGS = [
  "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
  "--disable-component-update", "--disable-sync", "--no-first-run",
  "--disable-dev-shm-usage",
];

async function main() {
  const a = args();
  const timeout = Number(a.timeout) * 1000;
  const browser = await chromium.launch({
    executablePath: a.chromium, args: CHROMIUM_ARGS, headless: true, timeout: 60_000,
  });
  const logs = [];
  let page = null;
  try {
    page = await browser.newPage({ viewport: { width: Number(a.width), height: 1000 } });
    page.setDefaultTimeout(timeout);
    page.on("console", (m) => { if (m.type() === "error") logs.push(m.text()); });
    page.on("pageerror", (e) => logs.push(String(e)));
    const url = `${a.url}/lab/tree/${encodeURIComponent(a.notebook)}?token=${a.token}&reset`;
    await page.goto(url, { waitUntil: "domcontentloaded" });
    // the notebook is open and its kernel is ready
    await page.waitForFunction(() => {
      const w = window.jupyterapp?.shell?.currentWidget;
      return w?.sessionContext?.session?.kernel?.status === "idle" && w.content?.widgets?.length;
    }, null, { polling: 250 });
    if (Number(a.width) < 800) {  // a narrow window: the notebook gets the whole width
      await page.evaluate(() => {
        const shell = window.jupyterapp.shell;
        if (shell.collapseLeft) shell.collapseLeft();
        if (shell.collapseRight) shell.collapseRight();
      });
    }
    const started = Date.now();
    // sample the bar's label every 50 ms from now on, to see it move before the end
    await page.evaluate((stopAt) => {
      window.__seen = [];
      window.__stopped = null;
      window.__sampler = setInterval(() => {
        const label = document.querySelector(".widget-hprogress .widget-label");
        const text = label ? label.textContent : null;
        if (text && window.__seen[window.__seen.length - 1] !== text) window.__seen.push(text);
        if (stopAt && window.__stopped === null && text && parseInt(text, 10) >= stopAt) {
          const stop = [...document.querySelectorAll(".widget-button")]
            .find((b) => b.textContent.includes("Stop") && !b.disabled);
          if (stop) { stop.click(); window.__stopped = text; }
        }
      }, 50);
    }, a["stop-at"] ? Number(a["stop-at"]) : 0);
    await page.evaluate(() => window.jupyterapp.commands.execute("notebook:run-all-cells"));
    // done: a final bar colour (green / orange / red), the final figure, the plot image
    await page.waitForSelector(".widget-hprogress :is(.progress-bar-success, .progress-bar-warning, .progress-bar-danger)");
    await page.waitForFunction(() => {
      const imgs = [...document.querySelectorAll(".widget-image")];
      return imgs.length && imgs.every((i) => i.complete && i.naturalWidth > 0);
    }, null, { polling: 250 });
    await page.waitForSelector(".jp-RenderedImage img");
    await page.waitForFunction(() => {
      const w = window.jupyterapp.shell.currentWidget;
      return w.sessionContext.session.kernel.status === "idle";
    }, null, { polling: 250 });
    const seen = await page.evaluate(() => { clearInterval(window.__sampler); return window.__seen; });
    const stoppedAt = await page.evaluate(() => window.__stopped);
    const live = seen.filter((t) => parseInt(t, 10) > 0 && parseInt(t, 10) < 100);
    const state = await page.evaluate(() => {
      const label = document.querySelector(".widget-hprogress .widget-label");
      const bar = document.querySelector(".widget-hprogress .progress-bar");
      const imgs = [...document.querySelectorAll(".widget-image")];
      const panels = imgs.map((i) => {
        const r = i.getBoundingClientRect();
        return [i.naturalWidth, i.naturalHeight, Math.round(r.x), Math.round(r.y),
                Math.round(r.width)];
      });
      const headers = [...document.querySelectorAll(".widget-html-content")]
        .map((e) => e.textContent).filter((t) => t.includes("rows/s"));
      const plot = document.querySelector(".jp-RenderedImage img");
      const header = [...document.querySelectorAll(".widget-html-content")]
        .map((e) => e.textContent).find((t) => t.includes("rows/s"));
      const errors = [...document.querySelectorAll(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr'], .jp-RenderedText[data-mime-type='application/vnd.jupyter.error']")]
        .map((e) => e.textContent);
      return {
        progress: label?.textContent ?? null,
        barClass: bar?.className ?? null,
        barWidth: bar?.style?.width ?? null,
        image: imgs.length ? [imgs.slice(0, 3).reduce((s, i) => s + i.naturalWidth, 0),
                              Math.max(...imgs.slice(0, 3).map((i) => i.naturalHeight))] : null,
        panels,
        headers,
        plot: plot ? [plot.naturalWidth, plot.naturalHeight] : null,
        header: header ?? null,
        errors,
      };
    });
    // screenshot the dashboard's output area first in view, then the whole page
    const dash = page.locator(".jp-OutputArea-output:has(.widget-hprogress)").first();
    await dash.scrollIntoViewIfNeeded();
    await page.screenshot({ path: a.screenshot, fullPage: true });
    await dash.screenshot({ path: a.screenshot.replace(/\.png$/, "-dashboard.png") });
    const dashboards = page.locator(".jp-OutputArea-output:has(.widget-hprogress)");
    const n = await dashboards.count();
    for (let i = 0; i < n; i++) {
      await dashboards.nth(i).scrollIntoViewIfNeeded();
      await dashboards.nth(i).screenshot({
        path: a.screenshot.replace(/\.png$/, `-dashboard-${i}.png`) });
    }
    console.log(JSON.stringify({ ok: true, live, stoppedAt, seconds: (Date.now() - started) / 1000,
                                 ...state, console: logs.slice(0, 5) }));
  } catch (e) {
    if (page) await page.screenshot({ path: a.screenshot.replace(/\.png$/, "-failed.png") })
      .catch(() => null);
    throw e;
  } finally {
    await browser.close();
  }
}

main().catch((e) => {
  console.log(JSON.stringify({ ok: false, error: String(e && e.stack || e) }));
  process.exit(1);
});
