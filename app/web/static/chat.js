// The chat page: sign in with an API key (exchanged for a short-lived token at once), stream answers
// from /v1/chat/completions, keep conversations in this browser only. No inline code (the page's CSP
// allows this server's scripts only); every answer is rendered as sanitised HTML without images.
"use strict";

(() => {
  const STRINGS = window.PLI_STRINGS;
  const SESSION_KEY = "pli.session";
  const CHATS_KEY = "pli.chats";
  const LANGUAGE_KEY = "pli.language";

  const $ = (id) => document.getElementById(id);
  let language = pickLanguage();
  let session = readSession();
  let chats = readChats();
  let currentId = null;
  let model = null;
  let running = null; // {controller, stopped}
  let countdown = null;

  function pickLanguage() {
    const chosen = localStorage.getItem(LANGUAGE_KEY);
    if (chosen && STRINGS[chosen]) return chosen;
    return (navigator.languages || [navigator.language]).some((l) => /^zh\b/i.test(l)) ? "zh-CN" : "en";
  }
  const t = (name, ...args) => {
    const value = STRINGS[language][name];
    return typeof value === "function" ? value(...args) : value;
  };

  function applyLanguage() {
    document.documentElement.lang = language;
    for (const node of document.querySelectorAll("[data-i18n]")) node.textContent = t(node.dataset.i18n);
    for (const node of document.querySelectorAll("[data-i18n-placeholder]")) node.placeholder = t(node.dataset.i18nPlaceholder);
    for (const node of document.querySelectorAll("[data-i18n-label]")) node.setAttribute("aria-label", t(node.dataset.i18nLabel));
    $("language").lang = language === "en" ? "zh-CN" : "en";
    renderList();
    renderMessages();
  }

  // --- session: a token in sessionStorage, or (no tokens on this server) the key in memory only -------
  function readSession() {
    try {
      const stored = JSON.parse(sessionStorage.getItem(SESSION_KEY) || "null");
      return stored && typeof stored.token === "string" ? stored : null;
    } catch { return null; }
  }
  const sessionValid = () => session !== null && session.expiresAt > Date.now();
  const authorization = () => ({ Authorization: `Bearer ${session.token}` });

  async function signIn(key) {
    const issued = await fetch("/v1/auth/token", { method: "POST", headers: { Authorization: `Bearer ${key}` } });
    if (issued.ok) {
      const body = await issued.json();
      session = { token: body.access_token, expiresAt: Date.now() + body.expires_in * 1000 };
      sessionStorage.setItem(SESSION_KEY, JSON.stringify(session));
      return "";
    }
    const error = await errorOf(issued);
    if (issued.status !== 404 || error.code !== "tokens_disabled") return error.message;
    session = { token: key, expiresAt: Number.POSITIVE_INFINITY };
    return t("keyOnlyInMemory");
  }

  function signOut(message = "") {
    if (running) running.controller.abort();
    session = null;
    model = null;
    sessionStorage.removeItem(SESSION_KEY);
    $("api-key").value = "";
    $("sign-in-error").textContent = message;
    show();
  }

  function show() {
    const signedIn = sessionValid();
    $("sign-in-view").hidden = signedIn;
    $("chat-view").hidden = !signedIn;
    $("sign-out").hidden = !signedIn;
    (signedIn ? $("prompt") : $("api-key")).focus();
  }

  async function errorOf(response) {
    try {
      const body = await response.json();
      if (body && body.error) return { message: String(body.error.message), code: body.error.code || "" };
    } catch { /* not JSON: say the status */ }
    return { message: `HTTP ${response.status}`, code: "" };
  }

  async function loadModel() {
    const response = await fetch("/v1/models", { headers: authorization() });
    if (!response.ok) return response;
    model = (await response.json()).data[0].id;
    return null;
  }

  // --- conversations, kept in localStorage -------------------------------------------------------------
  function readChats() {
    try {
      const stored = JSON.parse(localStorage.getItem(CHATS_KEY) || "[]");
      return Array.isArray(stored) ? stored : [];
    } catch { return []; }
  }
  const saveChats = () => localStorage.setItem(CHATS_KEY, JSON.stringify(chats));
  const currentChat = () => chats.find((chat) => chat.id === currentId) || null;

  function newChat() {
    const chat = { id: crypto.randomUUID(), title: "", created: new Date().toISOString(), system: "",
      temperature: 0.7, maxTokens: 512, messages: [] };
    chats.unshift(chat);
    saveChats();
    openChat(chat.id);
  }

  function openChat(id) {
    currentId = id;
    const chat = currentChat();
    $("system-prompt").value = chat.system;
    $("temperature").value = chat.temperature;
    $("max-tokens").value = chat.maxTokens;
    renderList();
    renderMessages();
  }

  function button(text, onClick, className = "") {
    const node = document.createElement("button");
    node.type = "button";
    node.textContent = text;
    node.className = className;
    node.addEventListener("click", onClick);
    return node;
  }

  function renderList() {
    const list = $("chat-list");
    list.replaceChildren();
    for (const chat of chats) {
      const item = document.createElement("li");
      item.className = chat.id === currentId ? "current" : "";
      item.append(
        button(chat.title || t("untitled"), () => openChat(chat.id), "open"),
        button(t("exportMarkdown"), () => download(chat, "md"), "small"),
        button(t("exportJson"), () => download(chat, "json"), "small"),
        button(t("remove"), () => removeChat(chat.id), "small"),
      );
      list.append(item);
    }
  }

  function removeChat(id) {
    if (!window.confirm(t("confirmDelete"))) return;
    chats = chats.filter((chat) => chat.id !== id);
    saveChats();
    if (currentId === id) (chats.length ? openChat(chats[0].id) : newChat());
    else renderList();
  }

  function download(chat, kind) {
    const text = kind === "json" ? JSON.stringify(chat, null, 2) : asMarkdown(chat);
    const link = document.createElement("a");
    link.href = URL.createObjectURL(new Blob([text], { type: kind === "json" ? "application/json" : "text/markdown" }));
    link.download = `${(chat.title || "chat").replace(/[^\p{L}\p{N}]+/gu, "-").slice(0, 40)}.${kind}`;
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 1000);
  }

  function asMarkdown(chat) {
    const parts = [`# ${chat.title || t("untitled")}`];
    if (chat.system) parts.push(`*${t("systemPrompt")}:* ${chat.system}`);
    for (const message of chat.messages) parts.push(`**${t(message.role === "user" ? "you" : "assistant")}:**\n\n${message.content}`);
    return parts.join("\n\n") + "\n";
  }

  // --- rendering: Markdown to HTML, raw HTML shown as text, then DOMPurify as a second line ------------
  const escapeHtml = (text) => text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
  window.marked.use({
    gfm: true,
    breaks: true,
    renderer: {
      html: (token) => escapeHtml(token.text),
      // An image would be fetched from wherever the answer says: a way out for what the page shows.
      image: (token) => escapeHtml(token.text || token.href),
    },
  });
  window.DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    }
  });
  function renderMarkdown(text) {
    return window.DOMPurify.sanitize(window.marked.parse(text), {
      FORBID_TAGS: ["img", "style", "form", "input", "button", "iframe", "svg", "math", "video", "audio"],
      FORBID_ATTR: ["style"],
      ALLOWED_URI_REGEXP: /^(?:https?:|mailto:|#)/i,
    });
  }

  function messageNode(message) {
    const node = document.createElement("div");
    node.className = `message ${message.role}`;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = t(message.role === "user" ? "you" : "assistant");
    const body = document.createElement("div");
    body.className = "body";
    node.append(who, body);
    fillBody(body, message);
    return node;
  }

  function fillBody(body, message) {
    if (message.role === "user") {
      body.textContent = message.content;
      return;
    }
    body.innerHTML = renderMarkdown(message.content);
    for (const pre of body.querySelectorAll("pre")) {
      const copy = button(t("copy"), async () => {
        await navigator.clipboard.writeText(pre.querySelector("code")?.textContent ?? pre.textContent);
        copy.textContent = t("copied");
      }, "copy");
      pre.append(copy);
    }
  }

  function renderMessages() {
    const chat = currentChat();
    const messages = $("messages");
    messages.replaceChildren(...(chat ? chat.messages.map(messageNode) : []));
    messages.scrollTop = messages.scrollHeight;
    const last = chat?.messages.at(-1);
    $("regenerate").hidden = running !== null || !last || last.role !== "assistant";
  }

  function notice(text) {
    $("notice").textContent = text;
    $("notice").hidden = !text;
  }

  function waitThenAllowSending(seconds, say) {
    clearInterval(countdown);
    let left = seconds;
    $("send").disabled = true;
    notice(say(left));
    countdown = setInterval(() => {
      left -= 1;
      if (left > 0) { notice(say(left)); return; }
      clearInterval(countdown);
      $("send").disabled = false;
      notice("");
    }, 1000);
  }

  // --- asking: one streamed request at a time; Stop aborts it, which closes the connection -----------
  async function send() {
    const text = $("prompt").value.trim();
    const chat = currentChat();
    if (!text || running || $("send").disabled || !chat) return;
    chat.messages.push({ role: "user", content: text });
    if (!chat.title) chat.title = text.slice(0, 60);
    $("prompt").value = "";
    saveChats();
    renderList();
    renderMessages();
    await asking(chat);
  }

  async function regenerate() {
    const chat = currentChat();
    if (!chat || running || chat.messages.at(-1)?.role !== "assistant") return;
    chat.messages.pop();
    saveChats();
    renderMessages();
    await asking(chat);
  }

  // The body says whether a question is on its way (set before the first await, so at once): for styles
  // and for tests that wait for an answer to end.
  async function asking(chat) {
    document.body.dataset.state = "asking";
    try {
      await ask(chat);
    } finally {
      document.body.dataset.state = "idle";
    }
  }

  async function ask(chat) {
    if (!sessionValid()) { signOut(t("expired")); return; }
    notice("");
    if (model === null) {
      const refused = await loadModel().catch(() => "network");
      if (refused !== null) { await showFailure(refused); return; }
    }
    const controller = new AbortController();
    running = { controller, stopped: false };
    $("stop").hidden = false;
    $("send").hidden = true;
    $("regenerate").hidden = true;
    const answer = { role: "assistant", content: "" };
    const history = [...(chat.system ? [{ role: "system", content: chat.system }] : []), ...chat.messages];
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: { ...authorization(), "Content-Type": "application/json" },
        body: JSON.stringify({ model, messages: history, stream: true,
          temperature: Number(chat.temperature), max_tokens: Number(chat.maxTokens) }),
        signal: controller.signal,
      });
      if (!response.ok) { await showFailure(response); return; }
      chat.messages.push(answer);
      renderMessages();
      const body = $("messages").lastElementChild.querySelector(".body");
      await readEvents(response, (event) => {
        if (event.error) { notice(t("failed", event.error.message)); return; }
        const choice = event.choices?.[0];
        if (!choice) return;
        answer.content += choice.delta?.content ?? "";
        if (choice.finish_reason === "content_filter") notice(t("filtered"));
        fillBody(body, answer);
        $("messages").scrollTop = $("messages").scrollHeight;
      });
    } catch (error) {
      if (running?.stopped) notice(t("stopped"));
      else notice(t("network"));
    } finally {
      running = null;
      $("stop").hidden = true;
      $("send").hidden = false;
      saveChats();
      renderMessages();
    }
  }

  async function readEvents(response, onEvent) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffered = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffered += value;
      const lines = buffered.split("\n");
      buffered = lines.pop();
      for (const line of lines) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }

  async function showFailure(response) {
    if (response === "network") { notice(t("network")); return; }
    const retryAfter = Number(response.headers.get("Retry-After")) || 5;
    const error = await errorOf(response);
    if (response.status === 401) signOut(t("expired"));
    else if (response.status === 429) waitThenAllowSending(retryAfter, (s) => t("rateLimited", s));
    else if (response.status === 503) waitThenAllowSending(retryAfter, (s) => t("notReady", s));
    else if (error.code === "content_filter") notice(t("refused"));
    else notice(t("failed", error.message));
  }

  // --- wiring -----------------------------------------------------------------------------------------
  $("sign-in-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) { $("sign-in-error").textContent = t("needKey"); return; }
    $("sign-in").disabled = true;
    try {
      const said = await signIn(key);
      $("sign-in-error").textContent = said;
      if (sessionValid()) { show(); notice(said); }
    } catch {
      $("sign-in-error").textContent = t("network");
    } finally {
      $("sign-in").disabled = false;
      $("api-key").value = sessionValid() ? "" : $("api-key").value;
    }
  });
  $("sign-out").addEventListener("click", () => signOut());
  $("language").addEventListener("click", () => {
    language = language === "en" ? "zh-CN" : "en";
    localStorage.setItem(LANGUAGE_KEY, language);
    applyLanguage();
  });
  $("new-chat").addEventListener("click", newChat);
  $("composer").addEventListener("submit", (event) => { event.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (event) => {
    // While an input method composes (Chinese, Japanese...), Enter picks a candidate: it must not send.
    if (event.key !== "Enter" || event.shiftKey || event.isComposing || event.keyCode === 229) return;
    event.preventDefault();
    send();
  });
  $("stop").addEventListener("click", () => {
    if (!running) return;
    running.stopped = true;
    running.controller.abort();
  });
  $("regenerate").addEventListener("click", regenerate);
  for (const [id, field] of [["system-prompt", "system"], ["temperature", "temperature"], ["max-tokens", "maxTokens"]]) {
    $(id).addEventListener("change", () => {
      const chat = currentChat();
      if (!chat) return;
      chat[field] = $(id).value;
      saveChats();
    });
  }

  applyLanguage();
  if (chats.length) openChat(chats[0].id);
  else newChat();
  show();
})();
