import Foundation

/// `HERALD_SMTP_URL`, read strictly: `smtp://host:port` (plain, or `?starttls=required` to
/// upgrade) or `smtps://host:port` (TLS from the start). Anything else is refused when the
/// process starts: a mistyped `starttls=require` used to be ignored, and mail (and the SMTP
/// password) went out in plain text (a trial).
public enum SMTPURL {
    /// Why `text` is not an SMTP URL Herald can use; nil when it is.
    public static func problem(_ text: String) -> String? {
        guard let url = URLComponents(string: text), let scheme = url.scheme?.lowercased() else {
            return "not a URL: smtp://host:port, smtp://host:port?starttls=required or smtps://host:port"
        }
        guard scheme == "smtp" || scheme == "smtps" else { return "the scheme must be smtp or smtps" }
        guard let host = url.host, !host.isEmpty else { return "the URL names no host" }
        if let port = url.port, !(1...65535).contains(port) { return "the port must be 1 to 65535" }
        if url.user != nil || url.password != nil {
            return "the user and password go in HERALD_SMTP_USERNAME and HERALD_SMTP_PASSWORD, not in the URL"
        }
        guard url.path.isEmpty || url.path == "/", url.fragment == nil else { return "the URL has a path or a fragment" }
        for item in url.queryItems ?? [] {
            guard item.name == "starttls" else { return "unknown parameter \"\(item.name)\" (only starttls=required)" }
            guard scheme == "smtp" else { return "starttls does not apply to smtps, which is TLS from the start" }
            guard item.value == "required" else { return "starttls takes one value: required" }
        }
        return nil
    }

    /// `text` without its user information, to be shown in an error.
    public static func redacted(_ text: String) -> String {
        guard var url = URLComponents(string: text), url.user != nil || url.password != nil else { return text }
        url.user = nil
        url.password = nil
        return url.string ?? "(the URL)"
    }
}
