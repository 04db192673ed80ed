import Foundation
import Hummingbird

/// Pages that show Herald working (`GET /demo/bell`): static HTML and plain JavaScript, no
/// build step. Served only with `HERALD_DEMO_PAGES=1` (`make run` sets it).
enum DemoPages {
    static func register(on router: Router<HeraldRequestContext>) {
        // HEAD as GET (RequestMiddleware leaves out the body), as every page of the API.
        for method in [HTTPRequest.Method.get, .head] {
            router.on("/demo/bell", method: method) { _, _ in
                var headers = HTTPFields()
                headers[.contentType] = "text/html; charset=utf-8"
                headers[.cacheControl] = "no-store"
                headers[.contentSecurityPolicy] = "default-src 'self'; style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'"
                return Response(status: .ok, headers: headers, body: .init(byteBuffer: ByteBuffer(string: bellPage)))
            }
        }
    }

    /// The page, read once from the bundle.
    static let bellPage: String = {
        guard let url = Bundle.module.url(forResource: "bell", withExtension: "html", subdirectory: "Demo"),
            let text = try? String(contentsOf: url, encoding: .utf8)
        else { return "<!doctype html><title>Herald</title><p>The bell page is missing from this build.</p>" }
        return text
    }()
}
