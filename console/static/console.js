// The console's only script besides htmx: no business rule lives here.
// Every htmx request carries the session's CSRF token (from the page's meta tag),
// as every form does in its hidden field.
(function () {
  "use strict";
  document.addEventListener("htmx:configRequest", function (event) {
    var meta = document.querySelector('meta[name="csrf-token"]');
    if (meta) {
      event.detail.headers["X-CSRF-Token"] = meta.getAttribute("content");
    }
  });
})();
