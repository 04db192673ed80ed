import Foundation
import HTTPTypes
import Hummingbird

/// Which web origins may call the API from a browser (`HERALD_CORS_ORIGINS`, the Fetch
/// standard's CORS protocol): an integrator's own web app, served from another origin than
/// Herald's, reading its users' feed and stream. Only `/v1/` answers across origins (never
/// `/metrics`, the health checks or the demo pages), and never with credentials: Herald's
/// credentials are bearer tokens and stream tickets that a page of another origin does not
/// have, so there is no cookie to ride along. `*` still leaves out the sign-in routes.
public struct CrossOriginPolicy: Sendable, Equatable {
    /// nil: no origin (no CORS headers at all, as a same-origin deployment wants).
    let origins: Origins?

    enum Origins: Sendable, Equatable {
        case any
        case listed(Set<String>)
    }

    public static let none = CrossOriginPolicy(origins: nil)

    init(origins: Origins?) { self.origins = origins }

    /// The setting's value: empty for none, `*` for any, or a comma-separated list of origins
    /// (`https://app.example.com,http://localhost:5173`), each a scheme, a host and an optional
    /// port, as a browser's `Origin` header says it.
    public init(setting: String) throws(ConfigurationError) {
        let items = setting.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        if items.isEmpty {
            self = .none
        } else if items == ["*"] {
            self.init(origins: .any)
        } else {
            var listed = Set<String>()
            for item in items {
                guard let origin = Self.origin(item) else {
                    throw ConfigurationError(
                        variable: "HERALD_CORS_ORIGINS",
                        value: "\(item) (an origin is http:// or https://, a host and an optional port, nothing after; or * alone)")
                }
                listed.insert(origin)
            }
            self.init(origins: .listed(listed))
        }
    }

    /// `scheme://host[:port]` in the form browsers send (lowercase, no default port), or nil.
    static func origin(_ text: String) -> String? {
        guard let parts = URLComponents(string: text), let scheme = parts.scheme?.lowercased(), ["http", "https"].contains(scheme),
            let host = parts.host?.lowercased(), !host.isEmpty, parts.path.isEmpty, parts.query == nil, parts.fragment == nil,
            parts.user == nil, parts.password == nil
        else { return nil }
        let port = parts.port.flatMap { ($0 == 80 && scheme == "http") || ($0 == 443 && scheme == "https") ? nil : $0 }
        return "\(scheme)://\(host)" + (port.map { ":\($0)" } ?? "")
    }

    /// What `Access-Control-Allow-Origin` answers `origin` with on `path`, nil when it may not
    /// call. `*` leaves out the sign-in routes (`/v1/auth/`): any page could otherwise guess
    /// passwords from its visitors' browsers and read the tokens; a web app that signs its users
    /// in itself lists its origin.
    func allowedOrigin(_ origin: String, path: String) -> String? {
        switch origins {
        case nil: nil
        case .any: path.hasPrefix("/v1/auth/") ? nil : "*"
        case .listed(let listed): listed.contains(origin) ? origin : nil
        }
    }

    /// Whether answers under `/v1/` depend on the request's `Origin` (a list), so caches must
    /// keep them apart (`Vary: Origin`), whatever the origin was.
    var variesByOrigin: Bool {
        if case .listed = origins { true } else { false }
    }

    /// The request headers a page may send: what the contract reads.
    static let allowedHeaders = "Authorization, Content-Type, Idempotency-Key, Last-Event-ID, X-Request-Id"
    /// The response headers a page may read besides the safelisted ones.
    static let exposedHeaders =
        "Location, Retry-After, RateLimit, RateLimit-Policy, Idempotent-Replayed, WWW-Authenticate, Allow, X-Request-Id"
    /// Seconds a browser may keep a preflight's answer.
    static let maxAge = "600"

    /// The answer to a preflight (`OPTIONS` with `Access-Control-Request-Method` and `Origin`)
    /// of an operation under `/v1/`: 204 with what the path takes for an allowed origin, a 403
    /// naming the setting for another; nil for every other request (served as usual).
    func preflight(_ request: Request) throws(APIError) -> Response? {
        guard origins != nil, request.method == .options, request.uri.path.hasPrefix("/v1/"),
            let origin = request.headers[.origin], request.headers[.accessControlRequestMethod] != nil
        else { return nil }
        let methods = RequestMiddleware.allowedMethods(path: request.uri.path).filter { $0 != "OPTIONS" }
        guard !methods.isEmpty else { return nil }
        guard let allowed = allowedOrigin(origin, path: request.uri.path) else {
            throw .originNotAllowed(origin)
        }
        var headers: HTTPFields = [
            .accessControlAllowOrigin: allowed,
            .accessControlAllowMethods: methods.joined(separator: ", "),
            .accessControlAllowHeaders: Self.allowedHeaders,
            .accessControlMaxAge: Self.maxAge,
        ]
        if variesByOrigin { headers[.vary] = "Origin" }
        return Response(status: .noContent, headers: headers)
    }

    /// Lets the page of an allowed origin read `response` (any answer, a problem's too).
    func decorate(_ response: inout Response, for request: Request) {
        guard origins != nil, request.uri.path.hasPrefix("/v1/"), response.headers[.accessControlAllowOrigin] == nil else { return }
        if variesByOrigin { response.headers.append(HTTPField(name: .vary, value: "Origin")) }
        guard let origin = request.headers[.origin], let allowed = allowedOrigin(origin, path: request.uri.path) else { return }
        response.headers[.accessControlAllowOrigin] = allowed
        response.headers[.accessControlExposeHeaders] = Self.exposedHeaders
    }
}
