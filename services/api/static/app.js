// alpipe labeling page: plain JS over the labeling API (no build step, nothing from the internet).
//
// The page keeps a local queue of samples leased to this labeler and refills it before it runs
// dry, with every queued image already downloaded, so the next image shows the moment a label is
// given. Labels and undos are sent in the background, one at a time and in order, so an undo
// always reaches the API after the label it takes back.
(() => {
  "use strict";

  // The page is served at <api root>/ui/, so the API root is one level up (works behind a prefix).
  const API_ROOT = new URL("../", window.location.href);
  const QUEUE_LOW = 3; // refill when fewer than this many images are ready
  const BATCH = 6; // samples leased per query
  const POLL_MS = 4000; // side panel refresh
  const EMPTY_RETRY_MS = 5000; // ask again this often while nothing is left to label
  const ERROR_RETRY_MS = 2500; // and this often while the API cannot be reached
  const KEYS = "1234567890"; // shortcut of the first ten classes, in class order
  const MANY_CLASSES = 12; // more than this: a compact list with a filter box
  const SHORT_NAME = 2; // classes all named this short (digits, "A") get big square buttons
  const RECENT_MAX = 8;
  const RECENT_MAX_LONG = 6; // longer names, two a row and up to two lines each: three rows
  const UNDO_DEPTH = 50; // labels of this session that u can take back, newest first
  const STORAGE = { token: "alpipe.token", labeler: "alpipe.labeler" };

  const $ = (id) => document.getElementById(id);

  const state = {
    token: null, // bearer token (auth on)
    me: null, // GET /me
    auth: false,
    labeler: null,
    projects: [],
    project: null, // GET /projects/{p} .project (classes, strategy, query_size, ...)
    name: null,
    gen: 0, // bumped when the project changes: answers for an older one are dropped
    queue: [], // leased samples, images preloading or ready
    current: null,
    skipped: [], // leased samples passed over with s; handed back when the page is left
    refilling: null,
    refillError: null, // why the last query failed, until one succeeds
    exhausted: false,
    history: [], // labels of this session that undo can take back: {item, label, failed}
    chain: Promise.resolve(), // labels and undos, strictly in order
    mine: 0,
    labeled: null,
    labeledAt: 0, // when the labeled count last came from a label/undo answer
    keys: [], // the shortcut key of each class (null: click only)
    longNames: false, // some class name is longer than SHORT_NAME: names wrap instead of big buttons
    filterActive: 0, // in the class filter, which of the matching classes Enter picks
    poolTotal: 0, // labeled + unlabeled pool images
    querySize: null,
    modelLabels: 0, // labels the current model was trained on
    pollTimer: null,
    emptyTimer: null,
  };

  // --- storage (private browsing may refuse it: the page then asks again on every load) ---------

  function load(key) {
    try { return window.localStorage.getItem(key); } catch { return null; }
  }
  function save(key, value) {
    try {
      if (value === null) window.localStorage.removeItem(key);
      else window.localStorage.setItem(key, value);
    } catch { /* not persisted; fine for this session */ }
  }

  // --- HTTP ----------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function apiUrl(path, query) {
    const url = new URL(path.replace(/^\//, ""), API_ROOT);
    for (const [k, v] of Object.entries(query || {})) {
      if (v !== undefined && v !== null) url.searchParams.set(k, String(v));
    }
    return url;
  }

  function authHeaders(token = state.token) {
    return token ? { Authorization: `Bearer ${token}` } : {};
  }

  function detailOf(body, fallback) {
    if (body && typeof body.message === "string") return body.message;
    if (body && typeof body.detail === "string") return body.detail;
    return fallback;
  }

  async function request(path, { method = "GET", query, body, token, as = "json" } = {}) {
    const headers = authHeaders(token === undefined ? state.token : token);
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(apiUrl(path, query), {
        method, headers, body: body === undefined ? undefined : JSON.stringify(body), cache: "no-store",
      });
    } catch {
      throw new ApiError(0, "cannot reach the labeling API; check your connection");
    }
    if (!response.ok) {
      let parsed = null;
      try { parsed = await response.json(); } catch { /* not JSON */ }
      const fallback = `${response.status} ${response.statusText || "error"}`;
      let message = detailOf(parsed, fallback);
      if (response.status === 401) message = "token refused";
      else if (response.status === 403) message = `not allowed: ${message}`;
      throw new ApiError(response.status, message);
    }
    if (as === "blob") return response.blob();
    return response.status === 204 ? null : response.json();
  }

  const projectPath = (suffix = "") => `/projects/${encodeURIComponent(state.name)}${suffix}`;

  // --- notices -------------------------------------------------------------------------------

  function showBanner(message) {
    $("banner-text").textContent = message;
    $("banner").hidden = false;
  }
  function hideBanner() {
    $("banner").hidden = true;
  }

  function toast(message, kind = "info", ms = 3500) {
    const el = document.createElement("div");
    el.className = `toast toast-${kind}`;
    el.textContent = message;
    $("toasts").append(el);
    window.setTimeout(() => el.remove(), ms);
  }

  // A failed call: a refused token sends the labeler back to sign in; the rest is said once.
  function reportError(error, what) {
    if (error.status === 401) {
      signOut("token refused: sign in again");
      return;
    }
    showBanner(`${what}: ${error.message}`);
  }

  // --- views ---------------------------------------------------------------------------------

  function showView(name) {
    for (const view of ["loading", "signin", "projects", "label"]) {
      $(`${view}-view`).hidden = view !== name;
    }
    document.body.dataset.view = name;
  }

  function renderUser() {
    const name = state.labeler || "";
    $("user").hidden = !name;
    $("user-name").textContent = name;
    $("user-initial").textContent = name.slice(0, 1).toUpperCase();
    $("user-role").textContent = state.me && state.me.is_admin && state.auth ? "admin" : "";
    $("user-role").hidden = !$("user-role").textContent;
    $("sign-out").textContent = state.auth ? "Sign out" : "Change name";
  }

  // --- sign-in -------------------------------------------------------------------------------

  function askForCredential(mode, error = "") {
    showView("signin");
    $("user").hidden = true;
    $("project-picker").hidden = true;
    const input = $("signin-input");
    const form = $("signin-form");
    form.dataset.mode = mode;
    if (mode === "token") {
      $("signin-title").textContent = "Sign in to label";
      $("signin-hint").textContent = "Paste the access token your admin gave you. It is kept in this browser only.";
      $("signin-label").textContent = "Access token";
      input.type = "password";
      input.value = "";
    } else {
      $("signin-title").textContent = "Who is labeling?";
      $("signin-hint").textContent = "Access control is off on this server: your name is recorded with each label.";
      $("signin-label").textContent = "Your name";
      input.type = "text";
      input.value = load(STORAGE.labeler) || "";
    }
    $("signin-error").textContent = error;
    input.setAttribute("aria-invalid", error ? "true" : "false");
    input.focus();
  }

  async function onSignIn(event) {
    event.preventDefault();
    const value = $("signin-input").value.trim();
    const mode = $("signin-form").dataset.mode;
    if (!value) {
      $("signin-error").textContent = mode === "token" ? "Enter your access token." : "Enter your name.";
      return;
    }
    $("signin-submit").disabled = true;
    try {
      if (mode === "token") {
        let me;
        try {
          me = await request("/me", { token: value });
        } catch (error) {
          $("signin-error").textContent = error.status === 401 ? "token refused" : error.message;
          $("signin-input").setAttribute("aria-invalid", "true");
          $("signin-input").select();
          return;
        }
        state.token = value;
        save(STORAGE.token, value);
        await signedIn(me);
      } else {
        save(STORAGE.labeler, value);
        state.labeler = value;
        await signedIn(state.me);
      }
    } finally {
      $("signin-submit").disabled = false;
    }
  }

  function signOut(error = "") {
    leaveProject();
    state.token = null;
    save(STORAGE.token, null);
    if (!state.auth) save(STORAGE.labeler, null);
    state.labeler = null;
    askForCredential(state.auth || error ? "token" : "name", error);
  }

  async function signedIn(me) {
    state.me = me;
    state.auth = Boolean(me && me.auth);
    if (state.auth) state.labeler = me.name;
    else state.labeler = state.labeler || load(STORAGE.labeler);
    if (!state.labeler) return askForCredential("name");
    renderUser();
    await showProjects();
  }

  // --- projects ------------------------------------------------------------------------------

  async function showProjects() {
    let projects;
    try {
      projects = await request("/projects");
    } catch (error) {
      if (error.status === 401) return signOut("token refused");
      showView("projects");
      $("projects-hint").textContent = `Could not list the projects: ${error.message}`;
      return;
    }
    state.projects = projects;
    renderProjectPicker();
    const wanted = new URLSearchParams(window.location.search).get("project");
    if (wanted) return openProject(wanted);
    if (projects.length === 1) return openProject(projects[0].name);
    renderProjectList();
    showView("projects");
  }

  function renderProjectPicker() {
    const select = $("project-select");
    const placeholder = new Option("Choose a project…", "", true, true);
    placeholder.disabled = true;
    select.replaceChildren(placeholder, ...state.projects.map((p) => new Option(p.name, p.name)));
    $("project-picker").hidden = state.projects.length === 0;
  }

  function renderProjectList() {
    const list = $("project-list");
    list.replaceChildren();
    if (state.projects.length === 0) {
      $("projects-hint").textContent = state.auth && !state.me.is_admin
        ? "No project is open to you yet: ask an admin to grant you one."
        : "No projects yet: create one with POST /projects (see the API docs at /docs).";
      return;
    }
    $("projects-hint").textContent = "Pick a project to start labeling.";
    for (const p of state.projects) {
      const total = p.counts.labeled + p.counts.pool;
      const share = total ? p.counts.labeled / total : 0;
      const item = document.createElement("li");
      const link = document.createElement("a");
      link.className = "project-card";
      link.href = `?project=${encodeURIComponent(p.name)}`;
      link.innerHTML = `
        <span class="project-name"></span>
        <span class="project-facts muted small"></span>
        <span class="progress" aria-hidden="true"><span></span></span>
        <span class="project-count small"></span>`;
      link.querySelector(".project-name").textContent = p.name;
      link.querySelector(".project-facts").textContent =
        `${p.classes.length} classes · ${p.strategy} · ${p.model} · ` +
        (p.model_version ? `model v${p.model_version}` : "no model yet");
      link.querySelector(".progress span").style.width = `${(share * 100).toFixed(1)}%`;
      link.querySelector(".project-count").textContent =
        `${p.counts.labeled.toLocaleString()} of ${total.toLocaleString()} labeled`;
      item.append(link);
      list.append(item);
    }
  }

  // --- labeling ------------------------------------------------------------------------------

  // Hand the leases of images this page was served but not labeled (queued, shown, skipped) back
  // to the pool, so other labelers get them now rather than when the leases expire. keepalive
  // lets the request outlive a page that is being closed.
  function handBack() {
    if (!state.name) return;
    const now = Date.now() / 1000;
    const byToken = new Map();
    for (const item of [...state.queue, state.current, ...state.skipped]) {
      if (!item || !item.lease_token || !stillLeased(item, now)) continue;
      if (!byToken.has(item.lease_token)) byToken.set(item.lease_token, []);
      byToken.get(item.lease_token).push(item.sample_id);
    }
    const headers = { ...authHeaders(), "Content-Type": "application/json" };
    for (const [token, ids] of byToken) {
      const body = JSON.stringify({ lease_token: token, sample_ids: ids, labeler: state.labeler });
      fetch(apiUrl(projectPath("/leases/release")), { method: "POST", headers, body, keepalive: true })
        .catch(() => { /* the leases then expire on their own */ });
    }
  }

  const stillLeased = (item, now) => !item.expires_at || item.expires_at > now;

  function leaveProject() {
    handBack();
    state.gen += 1;
    window.clearInterval(state.pollTimer);
    window.clearTimeout(state.emptyTimer);
    for (const item of state.queue) releaseImage(item);
    if (state.current) releaseImage(state.current);
    for (const entry of state.history) releaseImage(entry.item);
    Object.assign(state, {
      queue: [], current: null, skipped: [], refilling: null, refillError: null, exhausted: false, history: [],
      mine: 0,
      labeled: null, labeledAt: 0, poolTotal: 0, querySize: null, modelLabels: 0,
      project: null, name: null, pollTimer: null, emptyTimer: null,
    });
    $("recent").replaceChildren();
    renderEmbedding(null);
  }

  async function openProject(name) {
    leaveProject();
    state.name = name;
    const gen = state.gen;
    let detail;
    try {
      detail = await request(projectPath());
    } catch (error) {
      if (error.status === 401) return signOut("token refused");
      const url = new URL(window.location.href);
      url.searchParams.delete("project");
      window.history.replaceState(null, "", url);
      state.name = null;
      $("project-select").value = "";
      renderProjectList();
      showView("projects");
      showBanner(error.status === 404 ? `There is no project named “${name}”.`
        : error.status === 403 ? `You are not allowed to label “${name}”; ask an admin to grant it.`
          : `Could not open “${name}”: ${error.message}`);
      return;
    }
    if (gen !== state.gen) return;
    hideBanner();
    state.project = detail.project;
    const url = new URL(window.location.href);
    url.searchParams.set("project", name);
    window.history.replaceState(null, "", url);
    document.title = `${name} · alpipe labeling`;
    $("label-title").textContent = `Labeling ${name}`;
    $("project-select").value = name;
    renderClasses();
    renderStats(detail);
    renderRecent();
    showView("label");
    $("stage").focus({ preventScroll: true });
    state.pollTimer = window.setInterval(poll, POLL_MS);
    showNext();
  }

  // Keys 1–9 and 0 pick the first ten classes in order; a project whose classes are the digits
  // themselves ("0"…"9", as in MNIST) gets each digit on its own key instead, so 3 means "3".
  function classKeys(classes) {
    const digits = classes.length <= KEYS.length && classes.every((c) => c.length === 1 && KEYS.includes(c))
      && new Set(classes).size === classes.length;
    return classes.map((c, i) => (digits ? c : i < KEYS.length ? KEYS[i] : null));
  }

  // A class name as text with a line-break opportunity after each _ - . / (class names such as
  // "03_china_bottom_left" have no spaces), so a long name wraps between its words, whole.
  function breakable(name) {
    const frag = document.createDocumentFragment();
    for (const part of String(name).split(/(?<=[_\-./])/)) {
      if (frag.childNodes.length) frag.append(document.createElement("wbr"));
      frag.append(part);
    }
    return frag;
  }

  // Three layouts, by the classes: "keys" (names of 1–2 characters, up to MANY_CLASSES: big square
  // buttons with the key in a corner), "names" (a longer name: wider buttons, the key on the left,
  // the whole name wrapping between its words) and "list" (more than MANY_CLASSES: compact rows
  // under a filter box, scrolling). The last-labels strip goes from four to two a row for longer names.
  function renderClasses() {
    const classes = state.project.classes;
    state.keys = classKeys(classes);
    state.longNames = classes.some((c) => [...c].length > SHORT_NAME);
    const layout = classes.length > MANY_CLASSES ? "list" : state.longNames ? "names" : "keys";
    $("class-picker").dataset.layout = layout;
    const box = $("classes");
    box.replaceChildren();
    // Columns as wide as the longest name needs (app.css), so names mostly fit on one line.
    box.style.setProperty("--name-chars", String(Math.max(...classes.map((c) => [...c].length))));
    classes.forEach((cls, i) => {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "class-btn";
      button.dataset.label = cls;
      button.title = cls;
      const key = state.keys[i];
      if (key) button.setAttribute("aria-keyshortcuts", key);
      button.setAttribute("aria-label", key ? `Label as ${cls} (key ${key})` : `Label as ${cls}`);
      if (key) {
        const kbd = document.createElement("kbd");
        kbd.textContent = key;
        button.append(kbd);
      }
      const name = document.createElement("span");
      name.className = "class-name";
      name.append(breakable(cls));
      button.append(name);
      button.addEventListener("click", () => labelCurrent(cls, button));
      box.append(button);
    });
    $("class-filter-row").hidden = layout !== "list";
    $("class-filter").value = "";
    applyFilter();
    $("key-hint").innerHTML = layout === "list"
      ? "Keys <kbd>1</kbd>–<kbd>9</kbd>, <kbd>0</kbd> pick the first ten classes; <kbd>/</kbd> filters; "
        + "<kbd>S</kbd> skip, <kbd>U</kbd> undo."
      : classes.length > 10
        ? "Keys <kbd>1</kbd>–<kbd>9</kbd>, <kbd>0</kbd> pick the first ten classes; click for the rest."
        : `Press a class key, <kbd>S</kbd> to skip, <kbd>U</kbd> to undo your last label.`;
  }

  // The class filter (list layout): every word typed must occur in the class name, case and
  // separators ignored ("china left" finds "03_china_bottom_left"). Enter labels with the
  // highlighted match (the first one; arrow keys move it), Escape clears, / comes back here.
  const words = (text) => text.toLowerCase().split(/[\s_\-./]+/).filter(Boolean);

  function filterMatches() {
    const wanted = words($("class-filter").value);
    return [...$("classes").children].filter((b) => {
      const name = words(b.dataset.label).join(" ");
      return wanted.every((w) => name.includes(w));
    });
  }

  function applyFilter() {
    const buttons = [...$("classes").children];
    const filtering = !$("class-filter-row").hidden && $("class-filter").value.trim() !== "";
    const matches = filtering ? filterMatches() : buttons;
    const shown = new Set(matches);
    state.filterActive = Math.min(Math.max(state.filterActive, 0), Math.max(matches.length - 1, 0));
    buttons.forEach((b) => {
      b.hidden = !shown.has(b);
      b.classList.toggle("active", filtering && b === matches[state.filterActive]);
    });
    const count = $("class-filter-count");
    count.classList.toggle("none", filtering && matches.length === 0);
    count.textContent = !filtering ? `${buttons.length} classes`
      : matches.length ? `${matches.length} of ${buttons.length}` : "no class matches";
    const active = filtering && matches[state.filterActive];
    if (active) scrollWithin($("classes"), active);
  }

  // Scroll the class list (not the page) so that button shows.
  function scrollWithin(box, el) {
    const outer = box.getBoundingClientRect(), inner = el.getBoundingClientRect();
    if (inner.top < outer.top) box.scrollTop -= outer.top - inner.top + 4;
    else if (inner.bottom > outer.bottom) box.scrollTop += inner.bottom - outer.bottom + 4;
  }

  function clearFilter() {
    $("class-filter").value = "";
    state.filterActive = 0;
    applyFilter();
    $("classes").scrollTop = 0;
  }

  function onFilterKey(event) {
    const input = $("class-filter");
    if (event.key === "Enter") {
      event.preventDefault();
      const matches = input.value.trim() ? filterMatches() : [];
      const pick = matches[state.filterActive];
      if (!pick) return;
      if (labelCurrent(pick.dataset.label, pick)) {
        clearFilter();
        $("stage").focus({ preventScroll: true });
      }
    } else if (event.key === "Escape") {
      event.preventDefault();
      if (input.value) clearFilter();
      else $("stage").focus({ preventScroll: true });
    } else if (event.key === "ArrowDown" || event.key === "ArrowUp") {
      event.preventDefault();
      const n = filterMatches().length;
      if (!n || !input.value.trim()) return;
      state.filterActive = (state.filterActive + (event.key === "ArrowDown" ? 1 : n - 1)) % n;
      applyFilter();
    }
  }

  // Queue ------------------------------------------------------------------------------------

  function preload(item) {
    item.ready = request(item.image_url, { as: "blob" }).then((blob) => {
      item.src = URL.createObjectURL(blob);
      const img = new Image();
      img.src = item.src;
      return img.decode().then(() => {
        item.width = img.naturalWidth;
        item.height = img.naturalHeight;
      }, () => {});
    }).catch((error) => {
      item.error = error;
    });
  }

  function releaseImage(item) {
    if (item && item.src) {
      URL.revokeObjectURL(item.src);
      item.src = null;
    }
  }

  function refill() {
    if (state.refilling || state.queue.length >= QUEUE_LOW || !state.name) return state.refilling;
    const gen = state.gen;
    state.refilling = (async () => {
      try {
        const out = await request(projectPath("/queries"), { query: { n: BATCH, labeler: state.labeler } });
        if (gen !== state.gen) return;
        state.exhausted = out.samples.length === 0;
        for (const s of out.samples) {
          const item = {
            sample_id: s.sample_id, score: s.score, image_url: s.image_url, guess: s.guess || null,
            lease_token: out.lease_token, expires_at: out.expires_at, model_version: out.model_version,
          };
          preload(item);
          state.queue.push(item);
        }
        if (document.body.dataset.view === "label" && !$("banner").hidden) hideBanner();
        state.refillError = null;
      } catch (error) {
        if (gen !== state.gen) return;
        state.refillError = error;
        reportError(error, "Could not get the next images");
      } finally {
        if (gen === state.gen) state.refilling = null;
      }
    })();
    return state.refilling;
  }

  // Show the next queued image (skipping ones whose lease ran out), then top the queue up.
  function showNext() {
    window.clearTimeout(state.emptyTimer);
    const now = Date.now() / 1000;
    let item = state.queue.shift() || null;
    while (item && item.expires_at && item.expires_at < now + 5) {
      releaseImage(item);
      item = state.queue.shift() || null;
    }
    state.current = item;
    renderCurrent();
    const gen = state.gen;
    const pending = refill();
    if (!item && pending) {
      pending.then(() => {
        if (gen === state.gen && !state.current) {
          if (state.queue.length) showNext();
          else waitForWork();
        }
      });
    } else if (!item) {
      waitForWork();
    }
  }

  function waitForWork() {
    renderCurrent();
    const gen = state.gen;
    state.emptyTimer = window.setTimeout(() => {
      if (gen === state.gen && !state.current) showNext();
    }, state.refillError ? ERROR_RETRY_MS : EMPTY_RETRY_MS);
  }

  async function renderCurrent() {
    const item = state.current;
    const img = $("sample-image");
    const message = $("stage-message");
    $("undo-btn").disabled = state.history.length === 0;
    $("skip-btn").disabled = !item;
    for (const b of $("classes").querySelectorAll("button")) {
      b.disabled = !item;
      b.classList.toggle("guessed", Boolean(item && item.guess && item.guess.label === b.dataset.label));
    }
    $("meta-queue").textContent = `${state.queue.length} queued`;
    if (!item) {
      img.hidden = true;
      img.removeAttribute("data-sample-id");
      $("stage-badge").hidden = true;
      message.hidden = false;
      message.textContent = state.refillError
        ? "The next images could not be fetched. Trying again in a moment…"
        : state.exhausted
          ? "Nothing left to label right now: every pool image is labeled or leased to someone. Checking again…"
          : "Loading the next images…";
      document.body.dataset.sample = "";
      setMeta(null);
      return;
    }
    setMeta(item);
    if (!item.src && !item.error) {
      img.hidden = true;
      img.removeAttribute("data-sample-id");
      message.hidden = false;
      message.textContent = "Loading the image…";
      await item.ready;
      if (state.current !== item) return;
    }
    if (item.error) {
      img.hidden = true;
      message.hidden = false;
      message.textContent = `Could not load this image (${item.error.message}). Press S to skip it.`;
      return;
    }
    img.src = item.src;
    img.alt = `Sample ${item.sample_id.slice(0, 12)} to label`;
    img.dataset.sampleId = item.sample_id;
    // Tiny images (8×8 digits) are scaled up with hard pixel edges instead of a blur.
    img.classList.toggle("pixelated", (item.width || 0) > 0 && item.width <= 128);
    img.hidden = false;
    message.hidden = true;
    const badge = $("stage-badge");
    badge.hidden = !(item.width && item.height);
    badge.textContent = item.width ? `${item.width}×${item.height}px` : "";
    document.body.dataset.sample = item.sample_id;
    item.shown = true;
  }

  function setMeta(item) {
    const guess = item && item.guess;
    const guessEl = $("meta-guess");
    guessEl.replaceChildren();
    if (guess) {
      const label = document.createElement("strong");
      label.append(breakable(guess.label));
      const conf = document.createElement("span");
      conf.className = "muted";
      conf.textContent = ` ${Math.round(guess.confidence * 100)}%`;
      guessEl.append(label, conf);
    } else {
      guessEl.textContent = item ? (item.model_version ? "—" : "no model yet") : "—";
    }
    const strategy = state.project ? state.project.strategy : "score";
    $("meta-score-label").textContent = item && !item.model_version ? "Order" : `Score (${strategy})`;
    $("meta-score").textContent = !item ? "—"
      : item.score === null ? "random fill-in"
      // Before a model, TypiClust's picks score above the random order's [0, 1) (schemas.COLD_START_PICK_FLOOR).
      : !item.model_version ? (item.score > 1 ? "typical (cold start)" : "random (cold start)")
      // auto's representative picks score 1 + their margin (schemas.REPRESENTATIVE_PICK_FLOOR).
      : item.score >= 1 && state.project && state.project.strategy === "auto"
        ? `${(item.score - 1).toFixed(3)} · representative` : item.score.toFixed(3);
    const id = $("meta-id");
    id.textContent = item ? item.sample_id.slice(0, 12) : "—";
    id.title = item ? item.sample_id : "";
  }

  // Labels and undo ----------------------------------------------------------------------------

  // Run fn after every earlier label/undo call has finished (failed calls do not stop the chain).
  function inOrder(fn) {
    const gen = state.gen;
    state.chain = state.chain.then(() => (gen === state.gen ? fn() : undefined)).catch(() => {});
    return state.chain;
  }

  // Network hiccups and 503s are retried a few times; anything else is final.
  async function withRetry(call) {
    for (let attempt = 0; ; attempt++) {
      try {
        return await call();
      } catch (error) {
        const transient = error.status === 0 || error.status === 503;
        if (!transient || attempt >= 4) throw error;
        showBanner(`${error.message} — retrying…`);
        await new Promise((resolve) => window.setTimeout(resolve, 500 * 2 ** attempt));
      }
    }
  }

  function flash(button) {
    if (!button) return;
    button.classList.add("pressed");
    window.setTimeout(() => button.classList.remove("pressed"), 160);
  }

  function labelCurrent(label, button) {
    const item = state.current;
    if (!item || !item.shown) return false; // never label an image the labeler has not seen yet
    flash(button);
    const entry = { item, label, failed: false };
    state.history.push(entry);
    if (state.history.length > UNDO_DEPTH) releaseImage(state.history.shift().item);
    state.mine += 1;
    renderMine();
    renderRecent();
    showNext();
    inOrder(async () => {
      try {
        // The token is read now, not when the key was pressed: an undo before this may have renewed it.
        const res = await withRetry(() => request(projectPath("/labels"), {
          method: "POST",
          body: {
            labeler: state.labeler,
            labels: [{ sample_id: item.sample_id, label, lease_token: item.lease_token }],
          },
        }));
        setLabeled(res.labeled);
        if (!$("banner").hidden) hideBanner();
      } catch (error) {
        entry.failed = true;
        forget(entry);
        if (error.status === 409) {
          toast("That image was leased to someone else in the meantime; moved on.", "warn");
          if (state.current === item) showNext(); // undone meanwhile: it is not ours to label
        } else {
          reportError(error, `Label “${label}” was not saved`);
        }
      }
    });
    return true;
  }

  // Drop a label the API did not take (an undo may have dropped it already).
  function forget(entry) {
    const i = state.history.indexOf(entry);
    if (i < 0) return;
    state.history.splice(i, 1);
    state.mine = Math.max(0, state.mine - 1);
    renderMine();
    renderRecent();
    $("undo-btn").disabled = state.history.length === 0;
  }

  function skip() {
    if (!state.current) return;
    flash($("skip-btn"));
    releaseImage(state.current);
    // Only skips whose lease still runs are worth handing back; the rest already went back.
    const now = Date.now() / 1000;
    state.skipped = state.skipped.filter((item) => stillLeased(item, now));
    state.skipped.push(state.current);
    showNext();
  }

  function undo() {
    const entry = state.history.pop();
    if (!entry) {
      toast("Nothing to undo.");
      return;
    }
    flash($("undo-btn"));
    state.mine = Math.max(0, state.mine - 1);
    renderMine();
    renderRecent();
    // Show the image again at once; the API leases it back to us with a new token.
    if (state.current) state.queue.unshift(state.current);
    state.current = entry.item;
    renderCurrent();
    inOrder(async () => {
      if (entry.failed) return; // never recorded (e.g. 409): nothing to take back
      try {
        const res = await withRetry(() => request(
          projectPath(`/labels/${encodeURIComponent(entry.item.sample_id)}`),
          { method: "DELETE", query: { labeler: state.labeler } },
        ));
        if (res && res.lease_token) Object.assign(entry.item, { lease_token: res.lease_token, expires_at: null });
        if (res && typeof res.labeled === "number") setLabeled(res.labeled);
      } catch (error) {
        reportError(error, "Undo failed");
      }
    });
  }

  // Side panel ---------------------------------------------------------------------------------

  function setLabeled(n, fromPoll = false) {
    state.labeled = n;
    if (!fromPoll) state.labeledAt = performance.now();
    $("stat-labeled").textContent = n.toLocaleString();
    renderProgress();
    renderNextModel();
  }

  // The trainer starts once query_size labels arrived that the current model has not seen.
  function renderNextModel() {
    if (!state.querySize || state.labeled === null) return;
    const left = Math.max(0, state.querySize - (state.labeled - state.modelLabels));
    $("stat-next").textContent = left > 0
      ? `next model after ${left} more label${left === 1 ? "" : "s"}` : "training the next model…";
  }

  // Labeled + unlabeled is the pool's size, which labeling does not change: the share labeled
  // then follows the newest count, whether it came from a label answer or from a poll.
  function renderProgress() {
    const total = Math.max(state.poolTotal || 0, state.labeled || 0);
    const share = total ? (state.labeled || 0) / total : 0;
    $("stat-labeled-sub").textContent = total
      ? `of ${total.toLocaleString()} pool images · ${Math.floor(share * 100)}%` : "no pool images yet";
    $("stat-progress").style.width = `${(share * 100).toFixed(1)}%`;
  }

  function renderMine() {
    $("stat-mine").textContent = state.mine.toLocaleString();
  }

  function renderRecent() {
    const list = $("recent");
    list.replaceChildren();
    const entries = state.history.slice(-(state.longNames ? RECENT_MAX_LONG : RECENT_MAX)).reverse();
    for (const entry of entries) {
      const li = document.createElement("li");
      const thumb = document.createElement("img");
      thumb.alt = "";
      if (entry.item.src) thumb.src = entry.item.src;
      if (entry.item.width && entry.item.width <= 128) thumb.className = "pixelated";
      const label = document.createElement("span");
      label.append(breakable(entry.label));
      li.append(thumb, label);
      li.title = `${entry.item.sample_id.slice(0, 12)} → ${entry.label}`;
      list.append(li);
    }
    list.classList.toggle("long", state.longNames);
    $("recent-empty").hidden = entries.length > 0;
  }

  async function poll() {
    if (!state.name || document.visibilityState === "hidden") return;
    const gen = state.gen;
    const started = performance.now();
    try {
      const detail = await request(projectPath());
      if (gen !== state.gen) return;
      renderStats(detail, started);
    } catch (error) {
      if (gen !== state.gen) return;
      if (error.status === 401) reportError(error, "");
      // Other failures: the next poll tries again; labeling goes on meanwhile.
    }
  }

  function renderStats(detail, started = performance.now()) {
    const counts = detail.counts;
    // A poll sent before our last label/undo answer may carry an older count: keep the newer one.
    state.poolTotal = counts.labeled + counts.pool;
    if (started >= state.labeledAt || state.labeled === null) setLabeled(counts.labeled, true);
    else renderProgress();
    const model = detail.model || { version: 0 };
    $("stat-model").textContent = model.version ? `v${model.version}` : "none";
    $("stat-model-sub").textContent = model.version
      ? `trained on ${model.n_labeled.toLocaleString()} labels` : "trains after the first batch";
    $("stat-accuracy").textContent = typeof model.test_accuracy === "number"
      ? `${(model.test_accuracy * 100).toFixed(1)}%` : "—";
    state.querySize = detail.project ? detail.project.query_size : null;
    state.modelLabels = model.version ? model.n_labeled : 0;
    renderNextModel();
    renderEmbedding(detail.embedding);
    drawCurve(detail.curve || []);
  }

  // The backbone embedding pass (embedding mode): progress until every image has its embedding
  // (the project serves a random order until then), one line once done, nothing otherwise.
  function renderEmbedding(emb) {
    const card = $("stat-embedding");
    if (!emb || typeof emb !== "object") {
      card.hidden = true;
      return;
    }
    const n = (v) => (Number.isFinite(v) ? v : 0);
    const total = n(emb.total), done = n(emb.done), failed = n(emb.failed);
    const backbone = typeof emb.backbone === "string" ? emb.backbone : "";
    const sub = $("embedding-sub");
    sub.textContent = backbone ? `backbone ${backbone.split("/")[0]}` : "";
    sub.title = backbone;
    if (emb.complete) {
      $("embedding-text").textContent = failed > 0
        ? `Embeddings ready (${done.toLocaleString()} of ${total.toLocaleString()} images) · ${failed.toLocaleString()} failed`
        : `Embeddings ready (${total.toLocaleString()} images)`;
      $("embedding-progress").hidden = true;
    } else {
      const parts = [`Embedding images: ${done.toLocaleString()} / ${total.toLocaleString()}`];
      if (Number.isFinite(emb.images_per_s)) parts.push(`${formatRate(emb.images_per_s)} img/s`);
      if (Number.isFinite(emb.eta_s)) parts.push(`~${formatDuration(emb.eta_s)} left`);
      if (failed > 0) parts.push(`${failed.toLocaleString()} failed`);
      // Each part on one line; a long line wraps between the parts only.
      $("embedding-text").replaceChildren(...parts.flatMap((part, i) => {
        const span = document.createElement("span");
        span.textContent = part;
        return i ? [" · ", span] : [span];
      }));
      const share = total ? Math.min(1, (done + failed) / total) : 0; // failed images are done with too
      $("embedding-progress").hidden = false;
      $("embedding-progress").setAttribute("aria-valuenow", String(Math.floor(share * 100)));
      $("embedding-bar").style.width = `${(share * 100).toFixed(1)}%`;
      sub.textContent += `${backbone ? " · " : ""}random image order until done`;
    }
    card.classList.toggle("complete", Boolean(emb.complete));
    card.hidden = false;
  }

  function formatRate(perS) {
    return perS >= 10 ? Math.floor(perS).toLocaleString() : perS.toFixed(1);
  }

  function formatDuration(seconds) {
    const s = Math.max(1, Math.round(seconds));
    if (s < 60) return `${s} s`;
    const m = Math.round(s / 60);
    if (m < 60) return `${m} min`;
    const h = Math.floor(m / 60);
    return m % 60 ? `${h} h ${m % 60} min` : `${h} h`;
  }

  // Learning curve as SVG: accuracy (y) against labels (x), one point per model version.
  function drawCurve(points) {
    const svg = $("curve");
    const NS = "http://www.w3.org/2000/svg";
    const W = 320, H = 170, L = 38, R = 14, T = 12, B = 26;
    const pts = points.filter((p) => typeof p.test_accuracy === "number")
      .sort((a, b) => a.n_labeled - b.n_labeled);
    svg.replaceChildren();
    const el = (tag, attrs, text) => {
      const node = document.createElementNS(NS, tag);
      for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
      if (text !== undefined) node.textContent = text;
      svg.append(node);
      return node;
    };
    const maxN = Math.max(10, ...pts.map((p) => p.n_labeled));
    const xStep = niceStep(maxN / 4);
    const xMax = Math.ceil(maxN / xStep) * xStep;
    const minAcc = pts.length ? Math.min(...pts.map((p) => p.test_accuracy)) : 0;
    const yMin = Math.max(0, Math.floor((minAcc - 0.05) * 5) / 5);
    const x = (n) => L + (n / xMax) * (W - L - R);
    const y = (a) => T + (1 - (a - yMin) / (1 - yMin)) * (H - T - B);
    for (let a = yMin; a <= 1.0001; a += 0.2) {
      el("line", { x1: L, x2: W - R, y1: y(a), y2: y(a), class: "grid" });
      el("text", { x: L - 6, y: y(a) + 3.5, class: "tick", "text-anchor": "end" }, `${Math.round(a * 100)}%`);
    }
    for (let n = 0; n <= xMax; n += xStep) {
      el("text", { x: x(n), y: H - B + 15, class: "tick", "text-anchor": "middle" }, String(n));
    }
    el("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" });
    if (!pts.length) {
      el("text", { x: (L + W - R) / 2, y: (T + H - B) / 2, class: "empty", "text-anchor": "middle" },
        "The curve starts with the first model");
      svg.setAttribute("aria-label", "Learning curve: no model with a test accuracy yet");
      return;
    }
    const line = pts.map((p, i) => `${i ? "L" : "M"}${x(p.n_labeled).toFixed(1)},${y(p.test_accuracy).toFixed(1)}`);
    const first = pts[0], last = pts[pts.length - 1];
    el("path", {
      d: `${line.join("")}L${x(last.n_labeled).toFixed(1)},${H - B}L${x(first.n_labeled).toFixed(1)},${H - B}Z`,
      class: "area",
    });
    el("path", { d: line.join(""), class: "line" });
    for (const p of pts) {
      const dot = el("circle", { cx: x(p.n_labeled), cy: y(p.test_accuracy), r: 3.2, class: "dot" });
      const title = document.createElementNS(NS, "title");
      title.textContent = `model v${p.model_version}: ${(p.test_accuracy * 100).toFixed(1)}% at ${p.n_labeled} labels`;
      dot.append(title);
    }
    const lx = x(last.n_labeled), ly = y(last.test_accuracy);
    el("text", { x: Math.min(lx, W - R - 2), y: Math.max(ly - 8, T + 8), class: "last",
      "text-anchor": lx > W - 60 ? "end" : "middle" }, `${(last.test_accuracy * 100).toFixed(1)}%`);
    svg.setAttribute("aria-label", `Learning curve: ${pts.length} model${pts.length === 1 ? "" : "s"}; ` +
      `latest v${last.model_version} at ${(last.test_accuracy * 100).toFixed(1)}% with ${last.n_labeled} labels`);
  }

  function niceStep(raw) {
    const pow = 10 ** Math.floor(Math.log10(Math.max(raw, 1)));
    for (const m of [1, 2, 5, 10]) if (m * pow >= raw) return m * pow;
    return 10 * pow;
  }

  // --- keyboard ------------------------------------------------------------------------------

  function onKey(event) {
    if (event.defaultPrevented || event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    if (document.body.dataset.view !== "label") return;
    const target = event.target;
    if (target && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName))) return;
    const key = event.key.toLowerCase();
    const classes = state.project ? state.project.classes : [];
    const index = key.length === 1 ? state.keys.indexOf(key) : -1;
    if (index >= 0) {
      event.preventDefault();
      labelCurrent(classes[index], $("classes").children[index]);
    } else if (key === "s") {
      event.preventDefault();
      skip();
    } else if (key === "u") {
      event.preventDefault();
      undo();
    } else if (key === "/" && !$("class-filter-row").hidden) {
      event.preventDefault();
      $("class-filter").focus();
      $("class-filter").select();
    }
  }

  // --- start ---------------------------------------------------------------------------------

  async function start() {
    document.addEventListener("keydown", onKey);
    $("signin-form").addEventListener("submit", onSignIn);
    $("sign-out").addEventListener("click", () => signOut());
    $("banner-close").addEventListener("click", hideBanner);
    $("skip-btn").addEventListener("click", skip);
    $("undo-btn").addEventListener("click", undo);
    $("class-filter").addEventListener("input", () => { state.filterActive = 0; applyFilter(); });
    $("class-filter").addEventListener("keydown", onFilterKey);
    $("project-select").addEventListener("change", (event) => {
      const url = new URL(window.location.href);
      url.searchParams.set("project", event.target.value);
      window.history.pushState(null, "", url);
      openProject(event.target.value);
    });
    window.addEventListener("popstate", () => {
      const name = new URLSearchParams(window.location.search).get("project");
      if (name && name !== state.name) openProject(name);
      else if (!name) {
        leaveProject();
        $("project-select").value = "";
        renderProjectList();
        showView("projects");
      }
    });
    document.addEventListener("visibilitychange", () => { if (document.visibilityState === "visible") poll(); });
    window.addEventListener("pagehide", () => handBack());

    state.token = load(STORAGE.token);
    let me;
    for (let attempt = 0; ; attempt++) {
      try {
        me = await request("/me");
        break;
      } catch (error) {
        if (error.status === 401) {
          // A stored token that no longer works is dropped; without one, auth is on and we ask.
          const refused = Boolean(state.token);
          state.token = null;
          save(STORAGE.token, null);
          state.auth = true;
          askForCredential("token", refused ? "token refused" : "");
          return;
        }
        if (error.status === 404) { // an API without access control: everyone labels under a name
          me = { name: null, is_admin: true, projects: null, auth: false };
          break;
        }
        showView("loading");
        $("loading-view").textContent = `${error.message}. Retrying…`;
        await new Promise((resolve) => window.setTimeout(resolve, Math.min(10000, 1000 * 2 ** attempt)));
      }
    }
    state.me = me;
    state.auth = Boolean(me.auth);
    if (!state.auth) {
      const name = load(STORAGE.labeler);
      if (!name) {
        askForCredential("name");
        return;
      }
      state.labeler = name;
    }
    await signedIn(me);
  }

  start();
})();
