// The review page's only script: saving a caption and "describe again" on the detail page, sent with the
// access token in a header (another site's page cannot add it). Text from the server is shown with
// textContent, never as HTML.
"use strict";

const token = document.querySelector('meta[name="autocaption-token"]').content;

async function post(url, body) {
  const response = await fetch(url, {
    method: "POST",
    headers: {"Content-Type": "application/json", "X-Autocaption-Token": token},
    body: JSON.stringify(body || {}),
    credentials: "same-origin",
  });
  const data = await response.json().catch(() => ({error: response.statusText}));
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function say(form, text, bad) {
  const message = form.querySelector(".message");
  message.textContent = text;
  message.classList.toggle("bad", Boolean(bad));
}

document.addEventListener("DOMContentLoaded", () => {
  const article = document.querySelector("article.detail");
  const form = document.getElementById("edit");
  if (!article || !form) return;
  const id = article.dataset.image;
  const words = (text) => text.split(/[,;\n]/).map((word) => word.trim()).filter(Boolean);
  // What the photo carries as the page shows it: a save sends only the fields the person changed, so the
  // keywords of a photo whose description alone was corrected are left as they are.
  const seen = () => ({description: form.description.value, keywords: words(form.keywords.value).join("\n"),
                       alt_text: form.alt_text.value});
  let shown = seen();
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = {sha256: form.dataset.sha256};
    if (form.description.value !== shown.description) body.description = form.description.value;
    if (words(form.keywords.value).join("\n") !== shown.keywords) body.keywords = words(form.keywords.value);
    if (form.alt_text.value !== shown.alt_text && form.alt_text.value.trim()) body.alt_text = form.alt_text.value;
    if (!("description" in body) && !("keywords" in body) && !("alt_text" in body)) {
      say(form, "Nothing changed.");
      return;
    }
    say(form, "Saving…");
    try {
      const saved = await post(`/api/images/${id}/caption`, body);
      form.description.value = saved.caption.description;
      form.keywords.value = saved.caption.keywords.join(", ");
      form.alt_text.value = saved.caption.alt_text || "";
      form.dataset.sha256 = saved.caption.sha256;
      shown = seen();
      say(form, "Saved into the photo as your caption; later runs keep it.");
    } catch (error) {
      say(form, `Not saved: ${error.message}`, true);
    }
  });
  document.getElementById("again").addEventListener("click", async () => {
    try {
      say(form, (await post(`/api/images/${id}/describe`)).message);
    } catch (error) {
      say(form, `Not queued: ${error.message}`, true);
    }
  });
});
