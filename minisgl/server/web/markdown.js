// A small Markdown renderer for model output. Invariant: model text only ever becomes Text nodes
// (textContent) inside elements created here; nothing is parsed as HTML, so a reply cannot inject markup.
// Covers what chat models write: fenced code, inline code, headings, lists, quotes, rules, bold, italic, links.
"use strict";

(function () {
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  const INLINE = new RegExp([
    /(`+)([\s\S]*?[^`])\1(?!`)/.source, // `code`
    /\*\*([^*\n]+?)\*\*|__([^_\n]+?)__/.source, // **bold**
    /\*([^*\s][^*\n]*?)\*|(?<![\w])_([^_\s][^_\n]*?)_(?![\w])/.source, // *italic*
    /\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/.source, // [text](http(s) URL)
  ].join("|"), "g");

  function inline(parent, text) {
    let last = 0;
    for (const m of text.matchAll(INLINE)) { // matchAll clones the regex: the recursion below keeps its own state
      if (m.index > last) parent.appendChild(document.createTextNode(text.slice(last, m.index)));
      if (m[1]) parent.appendChild(el("code", null, m[2]));
      else if (m[3] || m[4]) inline(parent.appendChild(el("strong")), m[3] || m[4]);
      else if (m[5] || m[6]) inline(parent.appendChild(el("em")), m[5] || m[6]);
      else if (m[7]) {
        const a = el("a", null, m[7]);
        a.href = m[8]; // only http(s) URLs reach here (the pattern), never javascript:
        a.target = "_blank";
        a.rel = "noopener noreferrer";
        parent.appendChild(a);
      }
      last = m.index + m[0].length;
    }
    if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
  }

  function lines(parent, ls) {
    ls.forEach((l, i) => {
      if (i) parent.appendChild(el("br"));
      inline(parent, l);
    });
  }

  function codeBlock(lang, code) {
    const wrap = el("div", "code-block");
    const head = el("div", "code-head");
    head.appendChild(el("span", "code-lang", lang || "code"));
    const copy = el("button", "code-copy", "Copy");
    copy.type = "button";
    copy.setAttribute("aria-label", "Copy code");
    copy.addEventListener("click", () => {
      if (!navigator.clipboard) return;
      navigator.clipboard.writeText(code).then(() => {
        copy.textContent = "Copied";
        setTimeout(() => (copy.textContent = "Copy"), 1200);
      }, () => {});
    });
    head.appendChild(copy);
    wrap.appendChild(head);
    const pre = el("pre");
    pre.tabIndex = 0; // a wide block scrolls by keyboard too
    pre.appendChild(el("code", null, code));
    wrap.appendChild(pre);
    return wrap;
  }

  const FENCE = /^\s{0,3}(```|~~~)\s*([\w+#.-]*)\s*$/;
  const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const BULLET = /^\s{0,3}[-*+]\s+(.*)$/;
  const ORDERED = /^\s{0,3}(\d{1,9})[.)]\s+(.*)$/;
  const QUOTE = /^\s{0,3}>\s?(.*)$/;
  const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;

  function render(text) {
    const root = document.createDocumentFragment();
    const src = text.replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    while (i < src.length) {
      const line = src[i];
      let m;
      if ((m = FENCE.exec(line))) { // an unclosed fence (still streaming) runs to the end
        const body = [];
        i++;
        while (i < src.length && !(src[i].trim().startsWith(m[1]) && src[i].trim().replace(/[`~]/g, "") === "")) {
          body.push(src[i++]);
        }
        i++;
        root.appendChild(codeBlock(m[2], body.join("\n")));
      } else if (!line.trim()) {
        i++;
      } else if ((m = HEADING.exec(line))) {
        inline(root.appendChild(el("h" + Math.min(6, m[1].length + 2))), m[2]);
        i++;
      } else if (RULE.test(line)) {
        root.appendChild(el("hr"));
        i++;
      } else if (BULLET.test(line) || ORDERED.test(line)) {
        const ordered = !BULLET.test(line);
        const re = ordered ? ORDERED : BULLET;
        const list = el(ordered ? "ol" : "ul");
        if (ordered) {
          const start = parseInt(ORDERED.exec(line)[1], 10);
          if (start !== 1) list.start = start;
        }
        let item = null;
        while (i < src.length && src[i].trim()) {
          const lm = re.exec(src[i]);
          if (lm) {
            item = list.appendChild(el("li"));
            inline(item, ordered ? lm[2] : lm[1]);
          } else if (BULLET.test(src[i]) || ORDERED.test(src[i]) || FENCE.test(src[i])) {
            break;
          } else {
            item.appendChild(el("br"));
            inline(item, src[i].trim());
          }
          i++;
        }
        root.appendChild(list);
      } else if (QUOTE.test(line)) {
        const body = [];
        while (i < src.length && QUOTE.test(src[i])) body.push(QUOTE.exec(src[i++])[1]);
        const q = root.appendChild(el("blockquote"));
        q.appendChild(render(body.join("\n")));
      } else {
        const para = [];
        while (i < src.length && src[i].trim() && !FENCE.test(src[i]) && !HEADING.test(src[i]) &&
               !BULLET.test(src[i]) && !ORDERED.test(src[i]) && !QUOTE.test(src[i])) {
          para.push(src[i++]);
        }
        lines(root.appendChild(el("p")), para);
      }
    }
    return root;
  }

  window.renderMarkdown = render;
})();
