import Foundation
import HeraldCore
import HeraldStore

/// Email: a multipart MIME message over SMTP, with RFC 8058 one-click unsubscribe.
struct EmailChannel: ChannelTransport {
    let transport: EmailTransport
    var channel: NotificationChannel { .email }

    func send(_ work: DeliveryWork, links: LinkBuilder, now: Date) async -> SendOutcome {
        let unsubscribe = links.unsubscribe(work, now: now)
        var linkValues = ["unsubscribe": unsubscribe]
        if let open = links.open(work, now: now) { linkValues["open"] = open }
        // The Subject header and the text/plain part are text: a payload's "Anne & O'Neil" stays
        // as written there, not "Anne &amp; O&#39;Neil"; the HTML part is escaped.
        let content = content(work, links: linkValues, escaping: .of(.email))
        let from = work.email.from ?? transport.defaultFrom
        let message: [UInt8]
        do {
            message = try MIMEMessage(
                from: .init(from, name: work.email.fromName ?? work.input.organisationName),
                replyTo: work.email.replyTo.map { .init($0) },
                to: .init(work.recipient.email, name: work.recipient.displayName),
                subject: content.subject, textBody: content.body, htmlBody: content.html,
                messageID: "\(work.delivery.id.lowercased)@\(from.split(separator: "@").last.map(String.init) ?? "herald")",
                date: now,
                extraHeaders: [("List-Unsubscribe", "<\(unsubscribe)>"), ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")]
            ).encoded()
        } catch {
            // `encoded()` throws only MIMEError, a sentence a tenant admin can read.
            return .refused(code: nil, error: "The message could not be built: \(error.description)", permanent: true, retryAfter: nil)
        }
        return await transport.send(from: from, to: work.recipient.email, message: message)
    }
}
