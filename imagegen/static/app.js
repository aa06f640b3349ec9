"use strict";
// The imagegen page: POSTs to this same function (it answers on any path) and shows the image.
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
  const image = $("image");
  const meta = $("meta");
  const warning = $("warning");
  const download = $("download");
  const historyList = $("history");
  const HISTORY_LIMIT = 12;
  const history = [];
  let controller = null;
  let ticker = null;
  let shown = null;

  prompt.maxLength = config.maxPromptChars;
  if (config.authMode !== "none") {
    $("credential-field").hidden = false;
    $("credential-label").textContent = config.authMode === "api-key" ? "API key" : "ID token";
  }
  fillChoice("model", config.models, config.defaultModel);
  fillChoice("provider", config.providers, config.defaultProvider);

  function fillChoice(name, values, preferred) {
    if (values.length < 2) return;
    const select = $(name);
    for (const value of values) select.add(new Option(value, value, false, value === preferred));
    $(`${name}-field`).hidden = false;
  }

  function requestBody() {
    const body = { prompt: prompt.value.trim() };
    const text = (id) => $(id).value.trim();
    if (text("negative-prompt")) body.negativePrompt = text("negative-prompt");
    if (text("size")) [body.width, body.height] = text("size").split("x").map(Number);
    if (text("steps")) body.steps = Number(text("steps"));
    if (text("guidance")) body.guidanceScale = Number(text("guidance"));
    if (text("seed")) body.seed = Number(text("seed"));
    if (config.models.length > 1) body.model = $("model").value;
    if (config.providers.length > 1) body.provider = $("provider").value;
    return body;
  }

  function setBusy(busy) {
    generateButton.disabled = busy;
    cancelButton.hidden = !busy;
    form.setAttribute("aria-busy", String(busy));
    clearInterval(ticker);
    elapsed.textContent = "";
    if (busy) {
      const started = performance.now();
      ticker = setInterval(() => {
        elapsed.textContent = `${((performance.now() - started) / 1000).toFixed(0)} s`;
      }, 250);
    }
  }

  function showError(message) {
    errorLine.textContent = message;
    errorLine.hidden = false;
    statusLine.textContent = "";
  }

  async function generate() {
    if (controller) return;
    const body = requestBody();
    if (!body.prompt) {
      showError("Write a prompt first.");
      prompt.focus();
      return;
    }
    errorLine.hidden = true;
    statusLine.textContent = "Generating… this usually takes 10 to 30 seconds.";
    controller = new AbortController();
    setBusy(true);
    const started = performance.now();
    try {
      const headers = { "Content-Type": "application/json" };
      const credential = $("credential").value.trim();
      if (credential) headers.Authorization = `Bearer ${credential}`;
      // The API answers on the page's own path; /index.html is the page only.
      const response = await fetch(location.pathname.replace(/index\.html$/, ""), {
        method: "POST",
        headers,
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      let data = null;
      try {
        data = await response.json();
      } catch {
        data = null;
      }
      if (!data || typeof data !== "object") {
        showError(`The server answered ${response.status} without an explanation. Try again in a minute.`);
      } else if (!data.success) {
        showError(data.error || `The server answered ${response.status}.`);
      } else {
        const seconds = ((performance.now() - started) / 1000).toFixed(1);
        const entry = { ...data, prompt: body.prompt };
        remember(entry);
        show(entry);
        statusLine.textContent = `Done in ${seconds} s.`;
      }
    } catch (error) {
      if (error.name === "AbortError") {
        statusLine.textContent = "Cancelled.";
      } else {
        showError(`Could not reach the server (${error.message}). Check your connection and try again.`);
      }
    } finally {
      controller = null;
      setBusy(false);
    }
  }

  function fileName(entry) {
    const slug = entry.prompt.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-+|-+$/g, "").slice(0, 40);
    return `imagegen-${slug || "image"}-${entry.seed ?? "noseed"}.png`;
  }

  function show(entry) {
    shown = entry;
    image.src = entry.imageUrl;
    image.alt = entry.prompt;
    meta.textContent = `Seed ${entry.seed} · ${entry.model} · ${entry.provider}`;
    warning.textContent = entry.warning || "";
    warning.hidden = !entry.warning;
    download.href = entry.imageUrl;
    download.download = fileName(entry);
    result.hidden = false;
    for (const button of historyList.querySelectorAll("button")) {
      button.setAttribute("aria-current", String(button.entry === entry));
    }
  }

  function remember(entry) {
    history.unshift(entry);
    history.length = Math.min(history.length, HISTORY_LIMIT);
    historyList.replaceChildren(
      ...history.map((item) => {
        const li = document.createElement("li");
        const button = document.createElement("button");
        button.type = "button";
        button.entry = item;
        button.setAttribute("aria-label", `Show "${item.prompt}" (seed ${item.seed})`);
        const thumb = document.createElement("img");
        thumb.src = item.imageUrl;
        thumb.alt = "";
        button.append(thumb);
        button.addEventListener("click", () => show(item));
        li.append(button);
        return li;
      }),
    );
    $("history-section").hidden = false;
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
  cancelButton.addEventListener("click", () => controller && controller.abort());
  $("reuse-seed").addEventListener("click", () => {
    if (!shown) return;
    $("seed").value = shown.seed;
    $("options").open = true;
    statusLine.textContent = `Seed ${shown.seed} will be used for the next image.`;
    prompt.focus();
  });
})();
