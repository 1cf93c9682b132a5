// Markdown for model output, which is untrusted: it becomes DOM nodes through Preact (every
// piece of text is a text node), never an HTML string, so no tag, attribute or script in it
// can take effect. Links keep only http(s) targets and open with rel="noopener noreferrer";
// nothing the text names is ever fetched (no images).

import { html } from "./vendor/htm-preact.js";

const SAFE_URL = /^https?:\/\/[^\s]+$/i;

export function Markdown({ text }) {
  const blocks = [];
  const fence = /```([^\n`]*)\n([\s\S]*?)(?:```|$)/g;
  let last = 0;
  let found;
  while ((found = fence.exec(text)) !== null) {
    if (found.index > last) blocks.push(...paragraphs(text.slice(last, found.index)));
    blocks.push(html`<${CodeBlock} language=${found[1].trim()} code=${found[2]} />`);
    last = fence.lastIndex;
  }
  if (last < text.length) blocks.push(...paragraphs(text.slice(last)));
  return html`<div class="markdown">${blocks}</div>`;
}

function paragraphs(text) {
  return text
    .split(/\n{2,}/)
    .filter((part) => part.trim())
    .map((part) => {
      const lines = part.split("\n");
      if (lines.every((line) => /^\s*[-*] /.test(line))) {
        return html`<ul>${lines.map((line) => html`<li>${inline(line.replace(/^\s*[-*] /, ""))}</li>`)}</ul>`;
      }
      const heading = part.match(/^(#{1,4}) (.*)$/);
      if (heading && lines.length === 1) {
        return html`<p class="heading">${inline(heading[2])}</p>`;
      }
      const children = [];
      lines.forEach((line, index) => {
        if (index) children.push(html`<br />`);
        children.push(...inline(line));
      });
      return html`<p>${children}</p>`;
    });
}

// Every part stops at the next character that could start another one, so a long run of
// unclosed "[" or "`" costs linear time, not quadratic.
const INLINE = /(`[^`\n]+`)|(\*\*[^*\n]+\*\*)|(\[([^[\]\n]+)\]\(([^()\s]+)\))/g;

function inline(text) {
  const out = [];
  let last = 0;
  let found;
  while ((found = INLINE.exec(text)) !== null) {
    if (found.index > last) out.push(text.slice(last, found.index));
    if (found[1]) out.push(html`<code>${found[1].slice(1, -1)}</code>`);
    else if (found[2]) out.push(html`<strong>${found[2].slice(2, -2)}</strong>`);
    else if (SAFE_URL.test(found[5])) {
      out.push(html`<a href=${found[5]} target="_blank" rel="noopener noreferrer">${found[4]}</a>`);
    } else {
      out.push(`${found[4]} (${found[5]})`); // not a web link: shown, never followed
    }
    last = INLINE.lastIndex;
  }
  if (last < text.length) out.push(text.slice(last));
  INLINE.lastIndex = 0;
  return out;
}

function CodeBlock({ language, code }) {
  const copy = () => navigator.clipboard?.writeText(code);
  return html`<div class="code">
    <div class="code-bar"><span>${language || "code"}</span>
      <button type="button" class="small" onClick=${copy}>Copy</button></div>
    <pre><code>${code}</code></pre>
  </div>`;
}
