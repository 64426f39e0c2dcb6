// Loads the example workflows into ComfyUI's real frontend in headless Chromium and reports what it shows.
//
//   node browser_workflows.js CONFIG.json
//
// CONFIG: {url, chromium, playwright_core (a node_modules folder holding playwright-core), pack (the
// custom_nodes folder name), workflows: [{name, path}], out (result JSON), shots (a folder for screenshots,
// or null)}. Driven by tests/comfyui/test_comfyui_browser.py, which makes the assertions; this script only
// observes: for each workflow, loaded with window.app.loadGraphData, every node (registered type or not,
// title) and its widgets as the frontend holds them (name, label, value, advanced, visible by default, and
// which widget a control widget belongs to), the frontend's own re-serialization of widgets_values, and the
// text of its missing-models panel (which files it offers to download);
// the template browser's cards for the pack (title, description, thumbnail image and the responses to the
// frontend's requests under /api/workflow_templates/); what
// clicking each card loads; and a probe graph with an unknown node type (so the test knows the missing-type
// check can fail).
'use strict';
const fs = require('fs');
const path = require('path');

const config = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const { chromium } = require(path.join(config.playwright_core, 'playwright-core'));
const ARGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
  '--disable-sync', '--no-first-run', '--disable-quic'];

function slug(name) {
  return name.replace(/\.json$/, '').replace(/[^A-Za-z0-9]+/g, '_');
}

// In the page: every node of the current graph with its widgets, as the frontend holds them.
function readGraph() {
  const LG = window.LiteGraph;
  return window.app.graph._nodes.map((n) => {
    const widgets = n.widgets || [];
    const owner = new Map();
    for (const w of widgets) for (const linked of w.linkedWidgets || []) owner.set(linked, w.name);
    const plain = (v) => (v === undefined ? null : JSON.parse(JSON.stringify(v)));
    return {
      id: n.id,
      type: n.type,
      registered: !!(LG && LG.registered_node_types[n.type]),
      title: n.title,
      show_advanced: !!n.showAdvanced,
      widgets: widgets.map((w) => ({
        name: w.name,
        label: w.label ?? null,
        type: w.type,
        value: plain(w.value),
        advanced: !!(w.advanced ?? w.options?.advanced),
        visible: typeof n.isWidgetVisible === 'function' ? n.isWidgetVisible(w) : null,
        serialize: w.serialize !== false,
        control_of: owner.has(w) ? owner.get(w) : null,
      })),
      serialized: plain(n.serialize().widgets_values ?? null),
    };
  });
}

// The "Missing Models" group of the errors panel (opened from the error toast's "View details"), as text,
// once it has stopped changing; null when the frontend shows none.
async function missingModels(page) {
  const group = page.locator('[data-testid="error-group-missing-model"]');
  if (!(await group.isVisible())) {
    const details = page.getByText('View details').first();
    try {
      await details.waitFor({ state: 'visible', timeout: 15000 });
      await details.click();
    } catch (e) {
      return null;
    }
  }
  try {
    await group.waitFor({ state: 'visible', timeout: 15000 });
  } catch (e) {
    return null;
  }
  let last = null;
  for (let i = 0; i < 30; i++) {
    await page.waitForTimeout(500);
    const text = await group.innerText();
    if (text === last) break;
    last = text;
  }
  return last;
}

async function templateDialog(page) {
  await page.evaluate(() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates'));
  const item = page.getByText(config.pack, { exact: true }).first();
  await item.waitFor({ timeout: 30000 });
  await item.scrollIntoViewIfNeeded();
  await item.click();
  await page.waitForSelector('[data-testid^="template-workflow-"]', { timeout: 30000 });
  // Thumbnails load lazily: wait until each card's image has finished (loaded or fallen back).
  await page.waitForFunction(() => [...document.querySelectorAll('[data-testid^="template-workflow-"] img')]
    .every((i) => i.complete), null, { timeout: 30000 });
  await page.waitForTimeout(500);
}

async function readCards(page) {
  return page.evaluate(() => [...document.querySelectorAll('[data-testid^="template-workflow-"]')].map((c) => {
    const img = c.querySelector('img');
    return {
      testid: c.dataset.testid,
      title: c.querySelector('h3')?.innerText ?? null,
      description: c.querySelector('p')?.innerText ?? null,
      thumbnail: img ? { src: img.src, width: img.naturalWidth, height: img.naturalHeight } : null,
    };
  }));
}

// Screenshots of one loaded workflow: the whole graph as the frontend fits it, then each QuantSparse node
// and the note at 100% with its advanced inputs shown.
async function shootWorkflow(page, name) {
  const base = path.join(config.shots, slug(name));
  await page.screenshot({ path: `${base}.png` });
  const ids = await page.evaluate(() => window.app.graph._nodes
    .filter((n) => n.type.startsWith('QuantSparse') || n.type === 'MarkdownNote').map((n) => n.id));
  for (const id of ids) {
    const type = await page.evaluate((id) => {
      const n = window.app.graph.getNodeById(id);
      n.showAdvanced = true;
      const need = n.computeSize();
      n.setSize([Math.max(n.size[0], need[0]), Math.max(n.size[1], need[1])]);
      const ds = window.app.canvas.ds;
      ds.scale = 1;
      ds.offset = [-n.pos[0] + 140, -n.pos[1] + 150];
      window.app.canvas.setDirty(true, true);
      window.app.canvas.draw(true, true);
      return n.type;
    }, id);
    await page.waitForTimeout(400);
    await page.screenshot({ path: `${base}__${id}_${type}.png` });
  }
}

(async () => {
  const result = { workflows: {}, missing_models: {}, cards: [], card_loads: {}, template_responses: [], probe: null,
    console_errors: [] };
  // A first visit opens the template browser over the canvas: mark the tutorial done for this user.
  await fetch(`${config.url}/settings/Comfy.TutorialCompleted`, { method: 'POST', body: 'true' });
  if (config.shots) await fetch(`${config.url}/settings/Comfy.Minimap.Visible`, { method: 'POST', body: 'false' });
  const browser = await chromium.launch({ executablePath: config.chromium, headless: true, args: ARGS });
  try {
    const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
    page.on('pageerror', (e) => result.console_errors.push(String(e)));
    page.on('response', (r) => {
      if (r.url().includes('/api/workflow_templates/')) {
        result.template_responses.push({ url: r.url(), status: r.status(), content_type: r.headers()['content-type'] ?? null });
      }
    });
    await page.goto(config.url, { waitUntil: 'domcontentloaded', timeout: 120000 });
    await page.waitForFunction(() => window.app && window.app.graph && window.app.canvas && window.LiteGraph
      && Object.keys(window.LiteGraph.registered_node_types).length > 0, null, { timeout: 120000 });
    await page.waitForTimeout(1500);

    for (const wf of config.workflows) {
      const graph = JSON.parse(fs.readFileSync(wf.path, 'utf8'));
      await page.evaluate((g) => window.app.loadGraphData(g), graph);
      await page.waitForTimeout(800);
      result.workflows[wf.name] = await page.evaluate(readGraph);
      result.missing_models[wf.name] = await missingModels(page);
      if (config.shots) await shootWorkflow(page, wf.name);
      await page.keyboard.press('Escape');
    }

    // The template browser, as a user opens it: the pack's cards, then each card clicked.
    await templateDialog(page);
    result.cards = await readCards(page);
    if (config.shots) await page.screenshot({ path: path.join(config.shots, 'template_browser.png') });
    await page.keyboard.press('Escape');
    for (const card of result.cards) {
      await templateDialog(page);
      await page.locator(`[data-testid="${card.testid}"]`).first().click();
      await page.waitForTimeout(1500);
      result.card_loads[card.title] = await page.evaluate(readGraph);
      if (config.shots) await page.screenshot({ path: path.join(config.shots, `from_template__${slug(card.title)}.png`) });
      await page.keyboard.press('Escape');
    }

    // A node type nobody registered: the missing-type check above must be able to see one.
    const probe = { last_node_id: 1, last_link_id: 0, links: [], groups: [], config: {}, extra: {}, version: 0.4,
      nodes: [{ id: 1, type: 'QSNoSuchNode', pos: [0, 0], size: [200, 80], flags: {}, order: 0, mode: 0,
        inputs: [], outputs: [], properties: {}, widgets_values: [1] }] };
    await page.evaluate((g) => window.app.loadGraphData(g), probe);
    await page.waitForTimeout(500);
    result.probe = await page.evaluate(readGraph);
  } finally {
    await browser.close();
  }
  fs.writeFileSync(config.out, JSON.stringify(result, null, 1));
})().catch((e) => {
  console.error(e && e.stack ? e.stack : e);
  process.exit(1);
});
