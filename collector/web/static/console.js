// exfilwatch console: the only script besides htmx. Loaded from /static (CSP: script-src 'self').
// 1. Every htmx request carries the session's CSRF token (from <meta name="csrf-token">);
//    plain forms carry it as a hidden field.
// 2. A refused htmx request shows the server's message in the flash area, not a dialog.
(function () {
  "use strict";
  function token() {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.getAttribute("content") : "";
  }
  document.addEventListener("htmx:configRequest", function (evt) {
    evt.detail.headers["X-CSRF-Token"] = token();
  });
  document.addEventListener("htmx:responseError", function (evt) {
    var flash = document.getElementById("flash");
    if (!flash) { return; }
    var doc = new DOMParser().parseFromString(evt.detail.xhr.responseText, "text/html");
    var message = doc.querySelector(".message");
    flash.textContent = message ? message.textContent : "The request was refused (" + evt.detail.xhr.status + ").";
    flash.hidden = false;
  });
  document.addEventListener("htmx:beforeRequest", function () {
    var flash = document.getElementById("flash");
    if (flash) { flash.hidden = true; flash.textContent = ""; }
  });
})();
