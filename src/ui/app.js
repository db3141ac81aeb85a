// Broadside dashboard: a read-only view of the analytics API, served by `broadside serve`.
// Vanilla JS, no build step. Every figure comes from an API answer; all text goes in through
// textContent / setAttribute (never innerHTML). The token lives in sessionStorage only.
'use strict';

(() => {
  const K_TOKEN = 'broadside.token';
  const K_WS = 'broadside.workspace';
  const WS_PATTERN = /^[A-Za-z0-9_.-]{1,128}$/;
  const EVENT_TYPES = ['submitted', 'delivered', 'opened', 'clicked', 'bounced', 'unsubscribed', 'complained'];
  const DEFAULT_TYPES = ['delivered', 'opened', 'clicked'];
  const GRANULARITIES = ['hour', 'day', 'week', 'month'];
  const SVG_NS = 'http://www.w3.org/2000/svg';

  // Figures of /campaign-statistics/, in display order: [field, label, kind].
  const FIGURES = [
    ['submitted', 'Submitted', 'n'], ['delivered', 'Delivered', 'n'], ['delivery_rate', 'Delivery rate', 'r'],
    ['opens', 'Opens', 'n'], ['unique_opens', 'Unique opens', 'n'], ['open_rate', 'Open rate', 'r'],
    ['clicks', 'Clicks', 'n'], ['unique_clicks', 'Unique clicks', 'n'], ['click_rate', 'Click rate', 'r'],
    ['click_to_open_rate', 'Click-to-open', 'r'],
    ['bounces', 'Bounces', 'n'], ['hard_bounces', 'Hard bounces', 'n'], ['soft_bounces', 'Soft bounces', 'n'],
    ['bounce_rate', 'Bounce rate', 'r'],
    ['unsubscribes', 'Unsubscribes', 'n'], ['unsubscribe_rate', 'Unsubscribe rate', 'r'],
    ['complaints', 'Complaints', 'n'], ['complaint_rate', 'Complaint rate', 'r'],
  ];

  // The ledger's reason codes, explained as `broadside why` does (pipeline Reason::explain).
  const REASONS = {
    missing_email: 'the email field is empty after trimming',
    invalid_email: 'the email address is not syntactically valid',
    missing_name: 'neither first_name nor last_name is present',
    invalid_name: "a name contains '*'",
    no_address: 'mail needs address1, which is empty',
    missing_zip: 'mail needs a zip, which is empty',
    missing_country: 'mail needs a country, which is empty',
    international: "the country is not in the campaign's mail.countries",
    hard_bounce: 'the address hard-bounced before',
    unsubscribed: 'the recipient unsubscribed',
    complaint: 'the recipient complained (marked as spam)',
    blocklisted: 'the recipient is on the organisation blocklist',
    cap_exceeded: "the campaign's billing cap was already reached",
    holdout: 'the recipient falls in the holdout (control) group',
    malformed_row: 'the source row could not be parsed',
    invalid_utf8: 'a field of the source row is not valid UTF-8',
    missing_key: 'the recipient key (account_number for mail) is empty',
    printer_approval_failed: "the printer's approval rules refused the address",
    could_not_generate_creative: 'the mail creative could not be rendered for this recipient',
    printer_rejected: 'the printer refused the mailpiece',
    printer_failed: 'the printer could not be reached or kept failing',
    enrichment_failed: 'mail needs address1; the address enrichment provider found none',
    duplicate: 'an earlier valid row of this run has the same recipient',
    already_sent: 'an earlier run of this campaign already sent to this recipient',
    soft_bounce_repeated: "the address soft-bounced repeatedly (the store's soft-bounce policy)",
  };

  const app = document.getElementById('app');
  const top = document.getElementById('top');
  let gen = 0; // bumped by every render: answers of an older render are dropped
  let loginError = '';

  // ---------- DOM helpers ----------

  function setAttrs(el, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'text') el.textContent = String(v);
      else if (k === 'on') for (const [ev, fn] of Object.entries(v)) el.addEventListener(ev, fn);
      else el.setAttribute(k, v === true ? '' : String(v));
    }
  }
  function add(el, kids) {
    for (const k of kids.flat(Infinity)) {
      if (k === null || k === undefined || k === false) continue;
      el.append(k instanceof Node ? k : document.createTextNode(String(k)));
    }
    return el;
  }
  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    setAttrs(el, attrs);
    return add(el, kids);
  }
  function svg(tag, attrs, ...kids) {
    const el = document.createElementNS(SVG_NS, tag);
    setAttrs(el, attrs);
    return add(el, kids);
  }
  function clear(el) { while (el.firstChild) el.removeChild(el.firstChild); return el; }
  const enc = encodeURIComponent;

  // ---------- formatting ----------

  const fmtInt = (v) => (v === null || v === undefined ? '—' : Number(v).toLocaleString('en-US'));
  const fmtRate = (v) => (v === null || v === undefined ? '—' : (v * 100).toFixed(2) + '%');
  const fmtLift = (v) => (v === null || v === undefined ? '—' : (v >= 0 ? '+' : '') + (v * 100).toFixed(2) + '%');
  const fmtTime = (s) => (s ? String(s).replace('T', ' ').replace(/(\.\d+)?(Z|[+-]\d\d:\d\d)$/, ' $2') : '—');
  function cellText(v) {
    if (v === null || v === undefined) return '';
    return typeof v === 'object' ? JSON.stringify(v) : String(v);
  }
  function bucketLabel(start, granularity) {
    const s = String(start);
    if (granularity === 'hour') return s.slice(0, 16).replace('T', ' ');
    if (granularity === 'month') return s.slice(0, 7);
    return s.slice(0, 10);
  }

  // ---------- API ----------

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  async function api(path, options = {}) {
    const headers = {
      Authorization: 'Bearer ' + (sessionStorage.getItem(K_TOKEN) || ''),
      workspace_id: sessionStorage.getItem(K_WS) || '',
      Accept: 'application/json',
    };
    let body;
    if (options.json !== undefined) {
      headers['Content-Type'] = 'application/json';
      body = JSON.stringify(options.json);
    }
    let res;
    try {
      res = await fetch(path, { method: options.method || 'GET', headers, body, cache: 'no-store', credentials: 'omit' });
    } catch (e) {
      throw new ApiError(0, 'The API could not be reached: ' + e.message);
    }
    const text = await res.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
    if (!res.ok) {
      const msg = data && typeof data.error === 'string' ? data.error : (text || res.statusText);
      const err = new ApiError(res.status, msg);
      if (res.status === 401 || res.status === 403) authFailed(err);
      throw err;
    }
    if (data === null) throw new ApiError(res.status, 'The API answered with something other than JSON.');
    return data;
  }

  function authFailed(err) {
    sessionStorage.removeItem(K_TOKEN);
    loginError = err.message + ' (HTTP ' + err.status + ')';
    gen++;
    renderLogin();
  }

  function errorBox(e) {
    const status = e instanceof ApiError ? e.status : 0;
    let msg = e instanceof ApiError && status ? 'HTTP ' + status + ': ' + e.message : String(e.message || e);
    if (status === 429) msg += ' — the server is busy; try again in a moment.';
    if (status === 504) msg += ' — the query took too long and was cancelled.';
    return h('div', { class: 'error', role: 'alert', 'data-test': 'error', 'data-status': status }, msg);
  }

  // Fills `box` with the result of `fetcher`, drawn by `draw`; loading and error states meanwhile.
  async function panel(box, my, fetcher, draw) {
    box.dataset.state = 'loading';
    clear(box).append(h('p', { class: 'loading' }, 'Loading…'));
    try {
      const data = await fetcher();
      if (my !== gen) return;
      clear(box);
      draw(data);
      box.dataset.state = 'ready';
    } catch (e) {
      if (my !== gen) return;
      clear(box).append(errorBox(e));
      box.dataset.state = 'error';
    }
  }

  // A keyset-paginated list as a table: head labels, one row per item, "Load more" for next pages.
  function listPanel(box, my, path, head, row, empty) {
    const load = (cursor, tbody, more) => api(path + (path.includes('?') ? '&' : '?') + 'limit=100' + (cursor ? '&cursor=' + enc(cursor) : ''))
      .then((page) => {
        if (my !== gen) return;
        for (const item of page.items || []) tbody.append(row(item));
        more.hidden = !page.next_cursor;
        more.onclick = () => {
          more.disabled = true;
          load(page.next_cursor, tbody, more).catch((e) => { if (my === gen) more.replaceWith(errorBox(e)); })
            .finally(() => { more.disabled = false; });
        };
        return page;
      });
    return panel(box, my, async () => {
      const tbody = h('tbody');
      const more = h('button', { class: 'secondary', type: 'button', 'data-test': 'more', hidden: true }, 'Load more');
      const first = await load(null, tbody, more);
      return { tbody, more, first };
    }, ({ tbody, more, first }) => {
      if (!(first.items || []).length) { box.append(h('p', { class: 'muted', 'data-test': 'empty' }, empty)); return; }
      box.append(h('div', { class: 'table-wrap' }, h('table', {},
        h('thead', {}, h('tr', {}, head.map(([label, cls]) => h('th', { class: cls }, label)))), tbody)), more);
    });
  }

  function numCell(field, v, kind) {
    const text = kind === 'r' ? fmtRate(v) : kind === 'l' ? fmtLift(v) : fmtInt(v);
    return h('td', { class: 'num', 'data-field': field, 'data-value': v === null || v === undefined ? '' : String(v) }, text);
  }

  // The known figures, then any numeric field the API added that this page does not know yet.
  function figureColumns(rows) {
    const known = new Set(FIGURES.map((f) => f[0]).concat(['variant', 'click_rate_lift_vs_control']));
    const extra = new Set();
    for (const r of rows) for (const [k, v] of Object.entries(r || {})) if (!known.has(k) && typeof v === 'number') extra.add(k);
    return FIGURES.concat([...extra].sort().map((k) => [k, k.replace(/_/g, ' '), /rate$/.test(k) ? 'r' : 'n']));
  }

  // ---------- routing ----------

  function parseRoute() {
    const raw = location.hash.replace(/^#/, '');
    const q = raw.indexOf('?');
    const path = q < 0 ? raw : raw.slice(0, q);
    const parts = path.split('/').filter(Boolean).map((p) => { try { return decodeURIComponent(p); } catch (_) { return p; } });
    return { name: parts[0] || 'campaigns', args: parts.slice(1), params: new URLSearchParams(q < 0 ? '' : raw.slice(q + 1)) };
  }

  // `#token=…&workspace=…[&page=/campaign/ID][&other=…]`: stored in sessionStorage, then the
  // fragment is replaced by the page's route so the token leaves the address bar (and history).
  function takeFragmentCredentials() {
    const raw = location.hash.replace(/^#/, '');
    if (raw.startsWith('/') || !/(^|&)(token|workspace)=/.test(raw)) return;
    const p = new URLSearchParams(raw);
    if (p.get('token')) sessionStorage.setItem(K_TOKEN, p.get('token'));
    if (p.get('workspace')) sessionStorage.setItem(K_WS, p.get('workspace'));
    let page = p.get('page') || '/campaigns';
    if (!page.startsWith('/')) page = '/' + page;
    const qi = page.indexOf('?');
    const params = new URLSearchParams(qi < 0 ? '' : page.slice(qi + 1));
    for (const [k, v] of p) if (!['token', 'workspace', 'page'].includes(k)) params.set(k, v);
    const qs = params.toString();
    history.replaceState(null, '', location.pathname + location.search + '#' + (qi < 0 ? page : page.slice(0, qi)) + (qs ? '?' + qs : ''));
  }

  // Rewrites the current route's parameters without a new history entry or a re-render.
  function setParams(params) {
    const raw = location.hash.replace(/^#/, '');
    const path = raw.split('?')[0] || '/campaigns';
    const qs = params.toString();
    history.replaceState(null, '', location.pathname + location.search + '#' + path + (qs ? '?' + qs : ''));
    app.dataset.href = location.href;
  }

  const PAGES = { campaigns: pageCampaigns, campaign: pageCampaign, recipient: pageRecipient, sql: pageSql };

  function render() {
    const my = ++gen;
    const route = parseRoute();
    app.dataset.href = location.href;
    app.dataset.route = route.name;
    if (!sessionStorage.getItem(K_TOKEN) || !sessionStorage.getItem(K_WS)) { renderLogin(); return; }
    loginError = '';
    renderTop(route.name);
    clear(app);
    (PAGES[route.name] || pageNotFound)(route, my);
  }

  // ---------- login and header ----------

  function renderLogin() {
    top.hidden = true;
    clear(top);
    app.dataset.route = 'login';
    const token = h('input', { type: 'password', name: 'token', autocomplete: 'off', spellcheck: 'false', required: true, 'data-test': 'login-token' });
    const ws = h('input', { name: 'workspace', required: true, autocomplete: 'off', spellcheck: 'false', 'data-test': 'login-workspace' });
    ws.defaultValue = sessionStorage.getItem(K_WS) || '';
    const problem = h('div', { class: 'error', role: 'alert', 'data-test': 'login-error', hidden: !loginError }, loginError);
    const form = h('form', { 'data-test': 'login-form', novalidate: true },
      h('label', {}, 'API token', token), h('label', {}, 'Workspace', ws), problem,
      h('button', { type: 'submit' }, 'Sign in'));
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      const t = token.value.trim();
      const w = ws.value.trim();
      if (!t) { problem.textContent = 'Enter an API token.'; problem.hidden = false; return; }
      if (!WS_PATTERN.test(w)) { problem.textContent = 'A workspace id is 1–128 letters, digits, "_", "." or "-".'; problem.hidden = false; return; }
      sessionStorage.setItem(K_TOKEN, t);
      sessionStorage.setItem(K_WS, w);
      render();
    });
    clear(app).append(h('section', { class: 'card login', 'data-test': 'login' },
      h('h1', {}, 'Broadside analytics'),
      h('p', { class: 'muted' }, 'Sign in with an API token (from `broadside token new`). It is kept in this tab only and forgotten when the tab closes.'),
      form));
    (loginError ? token : (ws.value ? token : ws)).focus();
  }

  function renderTop(current) {
    const wsNow = sessionStorage.getItem(K_WS) || '';
    const wsIn = h('input', { name: 'workspace', 'aria-label': 'Workspace', spellcheck: 'false', 'data-test': 'workspace-input' });
    wsIn.defaultValue = wsNow;
    const form = h('form', { class: 'ws' },
      h('span', { class: 'muted' }, 'Workspace ', h('b', { 'data-test': 'workspace' }, wsNow)), wsIn,
      h('button', { type: 'submit' }, 'Switch'),
      h('button', { type: 'button', 'data-test': 'logout', on: { click: logout } }, 'Log out'));
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      const w = wsIn.value.trim();
      if (!WS_PATTERN.test(w)) { wsIn.setCustomValidity('1–128 letters, digits, "_", "." or "-"'); wsIn.reportValidity(); return; }
      wsIn.setCustomValidity('');
      sessionStorage.setItem(K_WS, w);
      if (current === 'campaign') location.hash = '#/campaigns'; else render();
    });
    const link = (name, label) => h('a', { href: '#/' + name, class: current === name ? 'current' : null, 'aria-current': current === name ? 'page' : null, 'data-test': 'nav-' + name }, label);
    clear(top).append(h('span', { class: 'brand' }, 'Broadside'),
      h('nav', {}, link('campaigns', 'Campaigns'), link('recipient', 'Recipient'), link('sql', 'SQL')), form);
    top.hidden = false;
  }

  function logout() {
    sessionStorage.removeItem(K_TOKEN);
    sessionStorage.removeItem(K_WS);
    loginError = '';
    gen++;
    renderLogin();
  }

  function pageNotFound(route) {
    app.append(h('h1', {}, 'Not found'), h('p', {}, 'No page "' + route.name + '". ', h('a', { href: '#/campaigns' }, 'Campaigns')));
  }

  // ---------- campaigns ----------

  function rangeQuery(params) {
    const q = new URLSearchParams();
    if (params.get('from')) q.set('date_from', params.get('from'));
    if (params.get('to')) q.set('date_to', params.get('to'));
    return q;
  }

  function rangeControls(params, onApply) {
    const from = h('input', { type: 'date', 'data-test': 'date-from' });
    const to = h('input', { type: 'date', 'data-test': 'date-to' });
    from.defaultValue = params.get('from') || '';
    to.defaultValue = params.get('to') || '';
    const apply = () => {
      for (const [k, el] of [['from', from], ['to', to]]) { if (el.value) params.set(k, el.value); else params.delete(k); }
      onApply();
    };
    from.addEventListener('change', apply);
    to.addEventListener('change', apply);
    return [h('label', {}, 'From', from), h('label', {}, 'to', to), h('span', { class: 'muted' }, '(UTC days; "to" is inclusive of that day)')];
  }

  function pageCampaigns(route, my) {
    const box = h('div', { 'data-test': 'campaigns' });
    const load = () => {
      const q = rangeQuery(route.params).toString();
      setParams(route.params);
      panel(box, my, () => api('/campaign-statistics/' + (q ? '?' + q : '')), (data) => {
        const items = data.items || [];
        if (!items.length) { box.append(h('p', { class: 'muted', 'data-test': 'empty' }, 'No campaign has events in this workspace (and range).')); return; }
        const cols = figureColumns(items.map((c) => c.totals));
        box.append(h('p', { class: 'muted' }, items.length + (items.length === 1 ? ' campaign' : ' campaigns')),
          h('div', { class: 'table-wrap' }, h('table', {},
            h('thead', {}, h('tr', {}, h('th', {}, 'Campaign'), cols.map(([, label]) => h('th', { class: 'num' }, label)))),
            h('tbody', {}, items.map((c) => h('tr', { 'data-test': 'campaign-row', 'data-campaign': c.campaign_id },
              h('td', {}, h('a', { href: '#/campaign/' + enc(c.campaign_id) }, c.campaign_id)),
              cols.map(([f, , kind]) => numCell(f, (c.totals || {})[f], kind))))))));
      });
    };
    app.append(h('h1', {}, 'Campaigns'), h('div', { class: 'controls' }, rangeControls(route.params, load)), box);
    load();
  }

  // ---------- one campaign ----------

  function pageCampaign(route, my) {
    const id = route.args[0] || '';
    const p = route.params;
    const variants = h('div', { 'data-test': 'variants' });
    const chartBox = h('div', { 'data-test': 'timeseries' });
    const runs = h('div', { 'data-test': 'runs' });

    // Chart controls: granularity, time zone, event types; each change re-fetches the series.
    const gran = h('select', { 'data-test': 'granularity' }, GRANULARITIES.map((g) => {
      const o = h('option', { value: g }, g);
      o.defaultSelected = g === (p.get('granularity') || 'day');
      return o;
    }));
    const tz = h('input', { 'data-test': 'time-zone', size: 18, spellcheck: 'false' });
    tz.defaultValue = p.get('tz') || Intl.DateTimeFormat().resolvedOptions().timeZone || 'UTC';
    const chosen = (p.get('types') || DEFAULT_TYPES.join(',')).split(',').filter((t) => EVENT_TYPES.includes(t));
    const boxes = EVENT_TYPES.map((t) => {
      const cb = h('input', { type: 'checkbox', value: t, 'data-test': 'event-type' });
      cb.defaultChecked = chosen.includes(t);
      return cb;
    });
    const loadStats = () => {
      const q = rangeQuery(p).toString();
      panel(variants, my, () => api('/campaign-statistics/' + enc(id) + (q ? '?' + q : '')), drawVariants(variants));
    };
    const loadChart = () => {
      const types = boxes.filter((b) => b.checked).map((b) => b.value);
      p.set('granularity', gran.value);
      p.set('tz', tz.value.trim());
      p.set('types', types.join(','));
      setParams(p);
      if (!types.length) {
        clear(chartBox).append(h('p', { class: 'muted', 'data-test': 'empty' }, 'Select at least one event type.'));
        chartBox.dataset.state = 'ready';
        return;
      }
      const q = rangeQuery(p);
      q.set('granularity', gran.value);
      q.set('time_zone', tz.value.trim() || 'UTC');
      q.set('event_type', types.join(','));
      panel(chartBox, my, () => api('/campaign-statistics/' + enc(id) + '/time-series?' + q), (s) => drawChart(chartBox, s));
    };
    for (const el of [gran, tz, ...boxes]) el.addEventListener('change', loadChart);

    app.append(
      h('p', {}, h('a', { href: '#/campaigns' }, '← All campaigns')),
      h('h1', {}, 'Campaign ', h('span', { class: 'mono', 'data-test': 'campaign-id' }, id)),
      h('div', { class: 'controls' }, rangeControls(p, () => { loadStats(); loadChart(); })),
      h('h2', {}, 'Variants'), variants,
      h('h2', {}, 'Events over time'),
      h('div', { class: 'card' },
        h('div', { class: 'controls' },
          h('label', {}, 'Granularity', gran), h('label', {}, 'Time zone', tz),
          h('fieldset', {}, h('legend', {}, 'Event types'), boxes.map((b) => h('label', {}, b, b.value)))),
        chartBox),
      h('h2', {}, 'Runs'), runs);
    loadStats();
    loadChart();
    listPanel(runs, my, '/campaign-runs/?campaign_id=' + enc(id), [
      ['Run'], ['Status'], ['Started'], ['Finished'], ['Rows', 'num'], ['Sent', 'num'], ['Suppressed', 'num'],
      ['Skipped', 'num'], ['Holdout', 'num'], ['Errored', 'num'], ['Reasons'],
    ], runRow, 'This campaign has no runs in this workspace.');
  }

  const drawVariants = (box) => (data) => {
    const vs = data.variants || [];
    const cols = figureColumns([data.totals].concat(vs));
    const row = (attrs, label, f, lift) => h('tr', attrs, h('th', { scope: 'row' }, label),
      cols.map(([k, , kind]) => numCell(k, (f || {})[k], kind)), lift);
    box.append(h('div', { class: 'table-wrap' }, h('table', {},
      h('thead', {}, h('tr', {}, h('th', {}, 'Variant'), cols.map(([, l]) => h('th', { class: 'num' }, l)), h('th', { class: 'num' }, 'Click-rate lift vs control'))),
      h('tbody', {}, vs.map((v) => row({ 'data-test': 'variant-row', 'data-variant': v.variant === null || v.variant === undefined ? '' : v.variant },
        v.variant === null || v.variant === undefined ? '(no variant)' : v.variant, v, numCell('click_rate_lift_vs_control', v.click_rate_lift_vs_control, 'l')))),
      h('tfoot', {}, row({ 'data-test': 'totals-row' }, 'All', data.totals, h('td', {}))))));
    if (!vs.length) box.append(h('p', { class: 'muted', 'data-test': 'empty' }, 'No events for this campaign (in this range).'));
  };

  function runRow(r) {
    const d = r.decisions || {};
    const reasons = (r.reasons || []).filter((x) => x.count);
    return h('tr', { 'data-test': 'run-row', 'data-run': r.run_id },
      h('td', { class: 'mono' }, r.run_id), h('td', {}, h('span', { class: 'badge ' + (r.status || '') }, r.status || '—'),
        r.error ? h('span', { class: 'sub' }, r.error) : null),
      h('td', {}, fmtTime(r.started_at)), h('td', {}, fmtTime(r.finished_at)),
      numCell('rows', r.rows, 'n'),
      ['sent', 'suppressed', 'skipped', 'holdout', 'errored'].map((k) => numCell(k, d[k], 'n')),
      h('td', {}, reasons.length ? h('ul', { class: 'kv-list' }, reasons.map((x) => h('li', { 'data-reason': x.reason },
        x.decision + (x.reason ? ' / ' + x.reason : '') + ': ' + fmtInt(x.count)))) : '—'));
  }

  // An SVG line chart: one path per event type the API answered for, axes, legend, tooltips.
  function drawChart(box, series) {
    const buckets = series.buckets || [];
    const types = series.event_types || [];
    const g = series.granularity;
    if (!buckets.length) { box.append(h('p', { class: 'muted', 'data-test': 'empty' }, 'No events in this range.')); return; }
    const W = 960, H = 340, m = { l: 56, r: 48, t: 14, b: 48 };
    const pw = W - m.l - m.r, ph = H - m.t - m.b, n = buckets.length;
    const val = (b, t) => Number((b.counts || {})[t] || 0);
    let max = 0;
    for (const b of buckets) for (const t of types) max = Math.max(max, val(b, t));
    const step = niceStep(Math.max(max, 1) / 5);
    const yMax = Math.max(step, Math.ceil(max / step) * step);
    const x = (i) => m.l + (n === 1 ? pw / 2 : (i * pw) / (n - 1));
    const y = (v) => m.t + ph - (v / yMax) * ph;
    const root = svg('svg', { class: 'chart', viewBox: `0 0 ${W} ${H}`, role: 'img', 'data-test': 'chart',
      'data-granularity': g, 'data-time-zone': series.time_zone, 'data-buckets': n,
      'aria-label': `${types.join(', ')} per ${g} (${series.time_zone})` });
    const grid = svg('g', { class: 'grid' });
    const axis = svg('g', { class: 'axis' });
    for (let v = 0; v <= yMax + 1e-9; v += step) {
      grid.append(svg('line', { x1: m.l, x2: W - m.r, y1: y(v), y2: y(v) }));
      axis.append(svg('text', { x: m.l - 6, y: y(v) + 4, 'text-anchor': 'end' }, fmtInt(v)));
    }
    axis.append(svg('line', { x1: m.l, x2: W - m.r, y1: m.t + ph, y2: m.t + ph }), svg('line', { x1: m.l, x2: m.l, y1: m.t, y2: m.t + ph }));
    const every = Math.max(1, Math.ceil(n / 8));
    buckets.forEach((b, i) => {
      if (i % every) return;
      axis.append(svg('line', { x1: x(i), x2: x(i), y1: m.t + ph, y2: m.t + ph + 4 }),
        svg('text', { x: x(i), y: m.t + ph + 18, 'text-anchor': 'middle' }, bucketLabel(b.start, g)));
    });
    axis.append(svg('text', { x: m.l + pw / 2, y: H - 6, 'text-anchor': 'middle' }, `${g} starting (${series.time_zone})`));
    root.append(grid, axis);
    // Hover bands: the whole bucket's counts as a tooltip.
    if (n <= 2000) {
      const band = n === 1 ? pw : pw / (n - 1);
      const hover = svg('g', {});
      buckets.forEach((b, i) => {
        const x0 = Math.max(m.l, x(i) - band / 2);
        const x1 = Math.min(W - m.r, x(i) + band / 2);
        hover.append(svg('rect', { class: 'hover', x: x0, y: m.t, width: x1 - x0, height: ph },
        svg('title', {}, bucketLabel(b.start, g) + '\n' + types.map((t) => `${t}: ${fmtInt(val(b, t))}`).join('\n'))));
      });
      root.append(hover);
    }
    types.forEach((t, k) => {
      const total = buckets.reduce((s, b) => s + val(b, t), 0);
      const d = buckets.map((b, i) => `${i ? 'L' : 'M'}${x(i).toFixed(1)},${y(val(b, t)).toFixed(1)}`).join(' ');
      root.append(svg('path', { d, class: `series s${k % 7}`, 'data-test': 'series', 'data-event-type': t, 'data-total': total },
        svg('title', {}, `${t}: ${fmtInt(total)} in total`)));
      if (n <= 400) {
        const pts = svg('g', { class: `s${k % 7}` });
        buckets.forEach((b, i) => pts.append(svg('circle', { cx: x(i), cy: y(val(b, t)), r: 3 },
          svg('title', {}, `${bucketLabel(b.start, g)} — ${t}: ${fmtInt(val(b, t))}`))));
        root.append(pts);
      }
    });
    const legend = h('ul', { class: 'legend', 'data-test': 'legend' }, types.map((t, k) => h('li', { 'data-event-type': t },
      h('span', { class: `swatch s${k % 7}` }), `${t} (${fmtInt(buckets.reduce((s, b) => s + val(b, t), 0))})`)));
    const table = h('details', {}, h('summary', {}, 'Show the numbers'), h('div', { class: 'table-wrap' }, h('table', {},
      h('thead', {}, h('tr', {}, h('th', {}, 'Start'), types.map((t) => h('th', { class: 'num' }, t)))),
      h('tbody', {}, buckets.map((b) => h('tr', { 'data-test': 'bucket-row', 'data-start': b.start },
        h('td', {}, b.start), types.map((t) => numCell(t, val(b, t), 'n'))))))));
    box.append(root, legend, table);
  }

  function niceStep(raw) {
    const p = Math.pow(10, Math.floor(Math.log10(raw)));
    const f = raw / p;
    return Math.max(1, (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * p);
  }

  // ---------- recipient ----------

  // The decision in words, like `broadside why`.
  function explain(r) {
    const parts = [];
    let head;
    if (r.decision === 'sent') {
      const bits = [];
      if (r.variant) bits.push('variant ' + r.variant);
      if (r.ifur_file) bits.push('IFUR file ' + r.ifur_file + (r.ifur_line !== null && r.ifur_line !== undefined ? ' line ' + r.ifur_line : ''));
      head = 'sent' + (bits.length ? ': ' + bits.join(', ') : '');
    } else {
      head = (r.decision || 'undecided') + (r.reason ? ': ' + r.reason : '');
      parts.push(REASONS[r.reason] || (r.reason ? 'reason ' + r.reason : 'no reason recorded'));
    }
    if (r.suppression_list) parts.push('on list ' + r.suppression_list);
    if (r.detail) parts.push(r.detail);
    if (r.mail_state) {
      parts.push('mail state at the end of the run: ' + r.mail_state + (r.printer_id ? ', printer piece ' + r.printer_id : ''));
      if (r.current_mail_state) {
        parts.push('mail state now: ' + r.current_mail_state + (r.mail_state_event
          ? ' (tracking event ' + r.mail_state_event + ' at ' + (r.mail_state_at || '?') + ')' : ' (no tracking event moved it)'));
      }
    }
    return parts.length ? head + ' — ' + parts.join('; ') : head;
  }

  function pageRecipient(route, my) {
    const key = (route.args[0] || route.params.get('key') || '').trim();
    const input = h('input', { type: 'search', name: 'key', size: 36, spellcheck: 'false', placeholder: 'email or account key', 'data-test': 'recipient-input' });
    input.defaultValue = key;
    const form = h('form', { class: 'controls' }, h('label', {}, 'Recipient', input), h('button', { type: 'submit' }, 'Look up'));
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      const k = input.value.trim();
      if (k) location.hash = '#/recipient/' + enc(k);
    });
    app.append(h('h1', {}, 'Recipient'), form);
    input.focus();
    if (!key) { app.append(h('p', { class: 'muted' }, 'Look up an email address (or, for mail campaigns, an account key): every ledger decision about it and its events.')); return; }
    // The ledger stores email keys trimmed and lowercased, other keys trimmed.
    const norm = key.includes('@') ? key.toLowerCase() : key;
    const ledger = h('div', { 'data-test': 'ledger', 'data-key': norm });
    const events = h('div', { 'data-test': 'events' });
    app.append(h('h2', {}, 'Decisions'), ledger, h('h2', {}, 'Events'), events);
    // The recipient's history (decisions and events, newest first), every page of it: one
    // recipient's entries are few, and the recipient index finds them without a scan.
    const history = (async () => {
      const items = [];
      let cursor = null;
      do {
        const page = await api('/recipients/' + enc(key) + '/history?limit=1000' + (cursor ? '&cursor=' + enc(cursor) : ''));
        items.push(...(page.items || []));
        cursor = page.next_cursor;
      } while (cursor && my === gen);
      return items;
    })();
    const table = (box, head, rows, empty) => {
      if (!rows.length) { box.append(h('p', { class: 'muted', 'data-test': 'empty' }, empty)); return; }
      box.append(h('div', { class: 'table-wrap' }, h('table', {},
        h('thead', {}, h('tr', {}, head.map(([label, cls]) => h('th', { class: cls }, label)))), h('tbody', {}, rows))));
    };
    panel(ledger, my, () => history, (items) => table(ledger, [
      ['Campaign'], ['Run'], ['Run started'], ['Input row', 'num'], ['Decision'], ['Reason'], ['Variant'], ['Explanation'],
    ], items.filter((i) => i.kind === 'decision').map((r) => h('tr', { 'data-test': 'ledger-row', 'data-decision': r.decision, 'data-reason': r.reason || '', 'data-run': r.run_id, 'data-row': r.row },
      h('td', {}, h('a', { href: '#/campaign/' + enc(r.campaign_id) }, r.campaign_id)), h('td', { class: 'mono' }, r.run_id),
      h('td', {}, r.at ? fmtTime(r.at) : '—'),
      numCell('row', r.row === undefined || r.row === null ? null : r.row + 1, 'n'),
      h('td', {}, h('span', { class: 'badge ' + r.decision }, r.decision)), h('td', {}, r.reason || '—'), h('td', {}, r.variant || '—'),
      h('td', { 'data-test': 'explanation' }, explain(r)))), `No ledger row has the key "${norm}" in this workspace.`));
    if (!norm.includes('@')) {
      events.append(h('p', { class: 'muted' }, 'Events are looked up by email address; this key is not one.'));
      events.dataset.state = 'ready';
      return;
    }
    panel(events, my, () => history, (items) => table(events, [
      ['Time'], ['Type'], ['Campaign'], ['Variant'], ['Run'], ['Bounce type'], ['URL'],
    ], items.filter((i) => i.kind === 'event').map((e) => h('tr', { 'data-test': 'event-row', 'data-event-type': e.event_type, 'data-event-id': e.event_id },
      h('td', {}, fmtTime(e.ts)), h('td', {}, e.event_type), h('td', {}, e.campaign_id || '—'), h('td', {}, e.variant || '—'),
      h('td', { class: 'mono' }, e.run_id || '—'), h('td', {}, e.bounce_type || '—'), h('td', { class: 'mono' }, e.url || '—'))),
    'No events for this address in this workspace.'));
  }

  // ---------- SQL console ----------

  function csvField(v) {
    const s = cellText(v);
    return /[",\r\n]/.test(s) || /^\s|\s$/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
  }

  function pageSql(route, my) {
    const text = h('textarea', { spellcheck: 'false', 'aria-label': 'SQL', 'data-test': 'sql-input' });
    text.defaultValue = route.params.get('sql') || 'SELECT event_type, count(*) AS n FROM events GROUP BY event_type ORDER BY n DESC';
    const run = h('button', { type: 'button', 'data-test': 'sql-run' }, 'Run');
    const download = h('button', { type: 'button', class: 'secondary', disabled: true, 'data-test': 'sql-download' }, 'Download CSV');
    const result = h('div', { 'data-test': 'sql-result' });
    let shown = null;
    const go = () => {
      const sql = text.value.trim();
      if (!sql || run.disabled) return;
      route.params.set('sql', sql);
      setParams(route.params);
      run.disabled = true;
      download.disabled = true;
      shown = null;
      panel(result, my, () => api('/sql', { method: 'POST', json: { sql } }), (data) => {
        const cols = data.columns || [];
        const rows = data.rows || [];
        shown = { cols, rows };
        download.disabled = false;
        result.append(h('p', { 'data-test': 'sql-count', 'data-value': data.row_count }, fmtInt(data.row_count) + (data.row_count === 1 ? ' row' : ' rows')));
        if (data.truncated) {
          result.append(h('div', { class: 'notice', 'data-test': 'sql-truncated', 'data-by': data.truncated_by || '' },
            'Truncated: ' + (data.truncated_reason || data.truncated_by || 'the answer was cut') + '. The CSV holds the shown rows only.'));
        }
        result.append(h('div', { class: 'table-wrap' }, h('table', {},
          h('thead', {}, h('tr', {}, cols.map((c) => h('th', { class: rows.some((r) => typeof r[c] === 'number') ? 'num' : null }, c)))),
          h('tbody', {}, rows.map((r) => h('tr', { 'data-test': 'sql-row' }, cols.map((c) => {
            const v = r[c];
            return h('td', { class: typeof v === 'number' ? 'num' : null, 'data-column': c }, cellText(v));
          })))))));
      }).finally(() => { run.disabled = false; });
    };
    run.addEventListener('click', go);
    text.addEventListener('keydown', (ev) => {
      if (ev.key === 'Enter' && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); go(); }
    });
    download.addEventListener('click', () => {
      if (!shown) return;
      const lines = [shown.cols.map(csvField).join(',')].concat(shown.rows.map((r) => shown.cols.map((c) => csvField(r[c])).join(',')));
      const url = URL.createObjectURL(new Blob([lines.join('\r\n') + '\r\n'], { type: 'text/csv;charset=utf-8' }));
      const a = h('a', { href: url, download: 'broadside-query.csv' });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    });
    app.append(h('h1', {}, 'SQL'), h('div', { class: 'sql card' }, text,
      h('div', { class: 'stack' }, run, download, h('span', { class: 'muted' }, 'Ctrl+Enter runs. Read-only; this workspace only.'))), result);
    if (route.params.get('sql')) go(); else text.focus();
  }

  // ---------- start ----------

  takeFragmentCredentials();
  window.addEventListener('hashchange', () => { takeFragmentCredentials(); render(); });
  render();
})();
