"use strict";
// The imagegen page: POSTs to this same function (it answers on any path) asking for an event
// stream, shows each phase while the image is made, then the image.
(() => {
  const config = JSON.parse(document.getElementById("imagegen-config").textContent);
  const $ = (id) => document.getElementById(id);
  const form = $("generate-form");
  const prompt = $("prompt");
  const generateButton = $("generate");
  const cancelButton = $("cancel");
  const elapsed = $("elapsed");
  const statusLine = $("status");
  const errorLine = $("error");
  const result = $("result");
  const frame = $("frame");
  const image = $("image");
  const placeholder = $("placeholder");
  const phase = $("phase");
  const bar = $("bar");
  const meta = $("meta");
  const warning = $("warning");
  const download = $("download");
  const resultActions = $("result-actions");
  const historyList = $("history");
  const HISTORY_LIMIT = 12;
  const PARTIAL_IMAGES = 3;
  const HISTORY_KEY = "imagegen-history";
  // The API's field names, and the control that sets each (its label is what people read).
  const FIELD_CONTROLS = {
    prompt: "prompt",
    negativePrompt: "negative-prompt",
    width: "size",
    height: "size",
    steps: "steps",
    guidanceScale: "guidance",
    seed: "seed",
    model: "model",
    provider: "provider",
  };
  const CHECKED_CONTROLS = ["steps", "guidance", "seed"];
  // The API answers on the page's own path; /index.html is the page only.
  const apiPath = location.pathname.replace(/index\.html$/, "");
  const documentPath = (name) => (apiPath.endsWith("/") ? apiPath : `${apiPath}/`) + name;
  const history = [];
  let controller = null;
  let ticker = null;
  let shown = null;

  prompt.maxLength = config.maxPromptChars;
  if (config.authMode !== "none") {
    $("credential-field").hidden = false;
    $("credential-label").textContent = config.authMode === "api-key" ? "API key" : "ID token";
  }
  restoreHistory();
  describeServer();

  // A picker only where there is a choice; its first entry leaves the choice to the server
  // (its default and failover order), and only a choice the user made is sent.
  function fillChoice(name, values, preferred) {
    if (values.length < 2) return;
    const select = $(name);
    select.add(new Option(`Server's choice (${preferred})`, "", true, true));
    for (const value of values) select.add(new Option(value, value));
    $(`${name}-field`).hidden = false;
  }

  // What this server can do, said before anyone presses Generate.
  async function describeServer() {
    let capabilities;
    try {
      const response = await fetch(documentPath("capabilities.json"), { headers: { Accept: "application/json" } });
      capabilities = await response.json();
      if (!response.ok) throw new Error(capabilities.error || `HTTP ${response.status}`);
    } catch (error) {
      return; // an older or misconfigured server: Generate will say what is wrong
    }
    if (!capabilities.configured) {
      const notice = $("notice");
      notice.textContent = capabilities.message;
      notice.hidden = false;
      generateButton.disabled = true;
      generateButton.setAttribute("aria-describedby", "notice");
      return;
    }
    // The pickers list what this server offers.
    const providers = capabilities.providers || [];
    fillChoice("model", [...new Set(capabilities.backends.flatMap((b) => b.models))], capabilities.backends[0].defaultModel);
    fillChoice("provider", providers, providers[0]);
    const names = capabilities.backends.map((b) => `${b.name} (${b.defaultModel}${b.placeholder ? ", placeholders only" : ""})`);
    const server = $("server");
    server.textContent = `This server uses ${names.join(", then ")}.`;
    server.hidden = false;
    const limits = capabilities.limits;
    if (limits) {
      setRange("steps", limits.steps);
      setRange("guidance", limits.guidanceScale);
      setRange("seed", limits.seed);
      prompt.maxLength = limits.maxPromptChars;
    }
  }

  function setRange(id, range) {
    if (!range) return;
    $(id).min = range.minimum;
    $(id).max = range.maximum;
  }

  function labelOf(control) {
    const label = control.labels && control.labels[0];
    // The label's own words, without the text of the control inside it.
    const text = label ? [...label.childNodes].filter((n) => n.nodeType === Node.TEXT_NODE).map((n) => n.textContent).join("") : "";
    return text.trim() || control.name;
  }

  function requestBody() {
    const body = { prompt: prompt.value.trim() };
    const text = (id) => $(id).value.trim();
    if (text("negative-prompt")) body.negativePrompt = text("negative-prompt");
    if (text("size")) [body.width, body.height] = text("size").split("x").map(Number);
    if (text("steps")) body.steps = Number(text("steps"));
    if (text("guidance")) body.guidanceScale = Number(text("guidance"));
    if (text("seed")) body.seed = Number(text("seed"));
    if ($("model").value) body.model = $("model").value;
    if ($("provider").value) body.provider = $("provider").value;
    // Intermediate images while it is made, where the backend can show them (`partial` events).
    body.partialImages = PARTIAL_IMAGES;
    return body;
  }

  // The browser checks ranges before anything is sent: the message names the field as labelled.
  function rangeProblem() {
    for (const id of CHECKED_CONTROLS) {
      const control = $(id);
      if (control.checkValidity()) continue;
      const { min, max } = control;
      const whole = control.step === "1" ? "a whole number" : "a number";
      return { control, message: `${labelOf(control)} must be ${whole} from ${min} to ${max}.` };
    }
    return null;
  }

  function clearFieldErrors() {
    for (const control of form.querySelectorAll("[aria-invalid]")) {
      control.removeAttribute("aria-invalid");
      control.removeAttribute("aria-errormessage");
    }
  }

  function setBusy(busy) {
    form.setAttribute("aria-busy", String(busy));
    statusLine.classList.toggle("quiet", busy);
    cancelButton.hidden = !busy;
    clearInterval(ticker);
    elapsed.textContent = "";
    if (busy) {
      const started = performance.now();
      ticker = setInterval(() => {
        elapsed.textContent = `${((performance.now() - started) / 1000).toFixed(0)} s`;
      }, 250);
      // Focus moves before the button it may be on is disabled: it never drops to <body>.
      cancelButton.focus();
    }
    generateButton.disabled = busy;
  }

  function showError(message, control) {
    errorLine.textContent = message;
    errorLine.hidden = false;
    statusLine.textContent = "";
    if (control) {
      control.setAttribute("aria-invalid", "true");
      control.setAttribute("aria-errormessage", "error");
      if (control.closest("details")) control.closest("details").open = true;
      control.focus();
      control.scrollIntoView({ block: "center" });
    } else {
      errorLine.focus({ preventScroll: true });
      errorLine.scrollIntoView({ block: "center" });
    }
  }

  function showAnswerError(data, status) {
    if (!data || typeof data !== "object" || !data.error) {
      showError(`The server answered ${status} without an explanation. Try again in a minute.`);
      return;
    }
    const control = data.field && FIELD_CONTROLS[data.field] ? $(FIELD_CONTROLS[data.field]) : null;
    if (!control) {
      showError(data.error);
      return;
    }
    const label = labelOf(control);
    const message = data.error.replace(`The field "${data.field}"`, label).replaceAll(`"${data.field}"`, label);
    showError(message, control);
  }

  // --- the phases ---------------------------------------------------------------------------

  function waitingFrame(body) {
    const [width, height] = body.width ? [body.width, body.height] : [1, 1];
    frame.style.setProperty("--ratio", `${width} / ${height}`);
    frame.classList.add("waiting");
    image.hidden = true;
    placeholder.hidden = false;
    meta.textContent = "";
    warning.hidden = true;
    resultActions.hidden = true;
    result.hidden = false;
    setPhase("Sending the request…");
  }

  function setPhase(text, fraction) {
    phase.textContent = text;
    statusLine.textContent = text;
    if (fraction === undefined) return;
    bar.hidden = false;
    bar.value = fraction;
  }

  const routeName = (label) => (label && label.includes("/") ? label.split("/").pop() : label);

  function onEvent(name, data) {
    switch (name) {
      case "accepted":
        setPhase("Accepted; starting…");
        break;
      case "queued":
        setPhase(`Waiting for the model: ${data.position} ahead in line`);
        break;
      case "attempt":
        bar.hidden = true;
        setPhase(`Asking ${data.provider || data.backend} (${data.model})…`);
        break;
      case "retry": {
        const seconds = Math.max(0, Math.round(data.waitSeconds));
        const why = data.reason === "upstream_rate_limited" ? "Provider rate-limited" : "Provider busy";
        setPhase(`${why}, retrying in ${seconds} s`);
        break;
      }
      case "failover":
        setPhase(`Trying ${routeName(data.to)} instead`);
        break;
      case "progress":
        if (data.steps) setPhase(`Waiting for the model: step ${data.step} of ${data.steps}`, data.step / data.steps);
        else if (data.fraction !== undefined) setPhase(`Waiting for the model: ${Math.round(data.fraction * 100)} %`, data.fraction);
        break;
      case "partial":
        // The image so far, under the phase, until the result replaces it.
        image.src = data.imageUrl;
        image.alt = `Preview ${data.index + 1} of the image being made`;
        image.classList.add("partial");
        image.hidden = false;
        frame.classList.add("previewing");
        break;
      case "stored":
        setPhase("Saving the image…");
        break;
    }
  }

  // Server-Sent Events from a POST: read the body stream and split it into events.
  async function* readEvents(response) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      const from = Math.max(0, buffer.length - 1);
      buffer += value;
      let end = buffer.indexOf("\n\n", from);
      while (end >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let name = "message";
        let data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith(":")) continue; // a keep-alive comment
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "event") name = text;
          else if (field === "data") data += (data ? "\n" : "") + text;
        }
        if (data) yield { name, data: JSON.parse(data) };
        end = buffer.indexOf("\n\n");
      }
    }
  }

  async function generate() {
    if (controller || generateButton.disabled) return; // busy, or a server that cannot generate
    clearFieldErrors();
    const body = requestBody();
    if (!body.prompt) {
      showError("Write a prompt first.", prompt);
      return;
    }
    const problem = rangeProblem();
    if (problem) {
      showError(problem.message, problem.control);
      return;
    }
    errorLine.hidden = true;
    controller = new AbortController();
    const previous = shown;
    waitingFrame(body);
    setBusy(true);
    const started = performance.now();
    let outcome = null;
    try {
      const headers = { "Content-Type": "application/json", Accept: "text/event-stream" };
      const credential = $("credential").value.trim();
      if (credential) headers.Authorization = `Bearer ${credential}`;
      const response = await fetch(apiPath, { method: "POST", headers, body: JSON.stringify(body), signal: controller.signal });
      if ((response.headers.get("Content-Type") || "").startsWith("text/event-stream")) {
        for await (const event of readEvents(response)) {
          if (event.name === "result" || event.name === "error") {
            outcome = event;
            break;
          }
          onEvent(event.name, event.data);
        }
        if (!outcome) outcome = { name: "lost" };
      } else {
        // Refused before any work started (a bad field, credentials, the rate limit): JSON.
        let data = null;
        try {
          data = await response.json();
        } catch {
          data = null;
        }
        outcome = { name: data && data.success ? "result" : "error", data, status: response.status };
      }
    } catch (error) {
      outcome = { name: error.name === "AbortError" ? "cancelled" : "unreachable", error };
    } finally {
      controller = null;
      setBusy(false);
    }
    finish(outcome, body, previous, ((performance.now() - started) / 1000).toFixed(1));
  }

  function finish(outcome, body, previous, seconds) {
    frame.classList.remove("waiting", "previewing");
    image.classList.remove("partial");
    placeholder.hidden = true;
    bar.hidden = true;
    if (outcome.name === "result") {
      const entry = { ...outcome.data, prompt: body.prompt };
      remember(entry);
      show(entry);
      result.focus({ preventScroll: true });
      // Scrolled once the image has its height, so that it and its buttons are in view.
      const decoded = entry.imageUrl ? image.decode().catch(() => {}) : Promise.resolve();
      decoded.then(() => {
        result.scrollIntoView({ block: "start" });
        statusLine.textContent = `Done in ${seconds} s${entry.cached ? ", from cache" : ""}.`;
      });
      return;
    }
    // No new image: show the one before, if any.
    if (previous) show(previous);
    else result.hidden = true;
    if (outcome.name === "cancelled") {
      statusLine.textContent = "Cancelled.";
      generateButton.focus();
    } else if (outcome.name === "error") {
      showAnswerError(outcome.data, outcome.data && outcome.data.status ? outcome.data.status : outcome.status);
    } else if (outcome.name === "lost") {
      showError("The connection closed before the image arrived. Try again.");
    } else {
      showError(`Could not reach the server (${outcome.error.message}). Check your connection and try again.`);
    }
  }

  function fileName(entry) {
    const slug = entry.prompt.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-+|-+$/g, "").slice(0, 40);
    return `imagegen-${slug || "image"}-${entry.seed ?? "noseed"}.png`;
  }

  function show(entry) {
    shown = entry;
    result.hidden = false;
    frame.classList.remove("waiting");
    placeholder.hidden = true;
    image.hidden = !entry.imageUrl;
    if (entry.imageUrl) image.src = entry.imageUrl;
    else image.removeAttribute("src");
    image.alt = entry.prompt;
    const parts = [entry.backend, entry.provider, entry.model].filter(Boolean);
    if (entry.seed !== null && entry.seed !== undefined) parts.push(`Seed ${entry.seed}`);
    if (entry.cached) parts.push("from cache");
    meta.textContent = parts.join(" · ");
    warning.textContent = entry.warning || "";
    warning.hidden = !entry.warning;
    resultActions.hidden = false;
    download.hidden = !entry.imageUrl;
    if (entry.imageUrl) {
      download.href = entry.imageUrl;
      download.download = fileName(entry);
    }
    $("reuse-seed").hidden = entry.seed === null || entry.seed === undefined;
    for (const button of historyList.querySelectorAll("button")) {
      button.setAttribute("aria-current", String(button.entry === entry));
    }
  }

  // --- history: this tab's images, kept in sessionStorage across reloads ---------------------

  function remember(entry) {
    history.unshift(entry);
    history.length = Math.min(history.length, HISTORY_LIMIT);
    renderHistory();
    saveHistory();
  }

  function saveHistory() {
    // Images are large: keep the newest that fit in the tab's storage quota.
    for (let count = history.length; count >= 0; count--) {
      try {
        if (count === 0) sessionStorage.removeItem(HISTORY_KEY);
        else sessionStorage.setItem(HISTORY_KEY, JSON.stringify(history.slice(0, count)));
        return;
      } catch {
        // QuotaExceededError: try with one fewer
      }
    }
  }

  function restoreHistory() {
    let saved = [];
    try {
      saved = JSON.parse(sessionStorage.getItem(HISTORY_KEY) || "[]");
    } catch {
      saved = [];
    }
    if (!Array.isArray(saved)) return;
    history.push(...saved.filter((item) => item && typeof item.prompt === "string").slice(0, HISTORY_LIMIT));
    renderHistory();
  }

  function renderHistory() {
    historyList.replaceChildren(
      ...history.map((item) => {
        const li = document.createElement("li");
        const button = document.createElement("button");
        button.type = "button";
        button.entry = item;
        button.setAttribute("aria-label", `Show "${item.prompt}"${item.seed != null ? ` (seed ${item.seed})` : ""}`);
        button.setAttribute("aria-current", String(item === shown));
        const thumb = document.createElement("img");
        if (item.imageUrl) thumb.src = item.imageUrl;
        thumb.alt = "";
        button.append(thumb);
        button.addEventListener("click", () => show(item));
        li.append(button);
        return li;
      }),
    );
    $("history-section").hidden = history.length === 0;
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    generate();
  });
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      generate();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      generate();
    }
  });
  for (const id of CHECKED_CONTROLS.concat(["prompt"])) {
    $(id).addEventListener("input", () => $(id).removeAttribute("aria-invalid"));
  }
  cancelButton.addEventListener("click", () => controller && controller.abort());
  $("reuse-seed").addEventListener("click", () => {
    if (!shown) return;
    $("seed").value = shown.seed;
    $("options").open = true;
    statusLine.textContent = `Seed ${shown.seed} will be used for the next image.`;
    prompt.focus();
  });
})();
