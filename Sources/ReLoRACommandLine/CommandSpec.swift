import ReLoRACore

/// What a command of `relora` or `relora-bench` accepts and how it is explained: the one description from
/// which both the parser (`parse`) and the `--help` text (`usage`) are made, so they cannot disagree.
///
/// The grammar, the same for every command:
///   - `--name VALUE` or `--name=VALUE` for an option with a value; a value may start with a dash
///     (`--temperature -1`, `--prompt "-- a play"`) unless it is one of the command's own options;
///   - `--name` for a flag; `--name=...` on a flag is an error;
///   - an option given twice is an error unless it is repeatable (`--set`, `--in`), whose values are kept
///     in order;
///   - `-h` or `--help` anywhere (but after `--`) asks for the usage text, whatever else is wrong;
///   - everything else is a positional argument, and so is everything after `--`; a word starting with a
///     dash that is not an option (`-x`, `--lr-max`) is an error, never a positional.
/// Every error is one `ReLoRAError.usage` sentence that names the command and the option and ends with
/// "see `COMMAND --help`".
public struct CommandSpec: Sendable {
    /// The words that run it: "relora eval", "relora tokenizer train", "relora-bench gpu".
    public let name: String
    /// One line: what it does, for the command lists (`relora --help`) and the first line of `usage`.
    public let summary: String
    /// Usage lines after `name` when generated ones would not say it (alternatives such as
    /// `train RECIPE.json` | `train --resume RUN_DIR`); empty: made from the positionals and options.
    public let synopsis: [String]
    /// Paragraphs after the usage line: what it reads, writes and prints. Written wrapped at 110 columns.
    public let discussion: String
    public let positionals: PositionalSpec?
    public let options: [OptionSpec]
    /// Whole command lines, each shown under "Examples:".
    public let examples: [String]
    /// Commands one level below (`relora tokenizer` -> `train`), listed in the usage text.
    public let subcommands: [CommandSpec]
    /// Whether no arguments at all means `--help` (for commands that cannot do anything without some).
    public let helpWhenEmpty: Bool

    public init(name: String, summary: String, synopsis: [String] = [], discussion: String = "",
                positionals: PositionalSpec? = nil, options: [OptionSpec] = [], examples: [String] = [],
                subcommands: [CommandSpec] = [], helpWhenEmpty: Bool = false) {
        precondition(Set(options.map(\.name)).count == options.count, "\(name): an option is declared twice")
        precondition(!options.contains { $0.name == "help" }, "\(name): --help is every command's own")
        self.name = name
        self.summary = summary
        self.synopsis = synopsis
        self.discussion = discussion
        self.positionals = positionals
        self.options = options
        self.examples = examples
        self.subcommands = subcommands
        self.helpWhenEmpty = helpWhenEmpty
    }

    public func option(_ name: String) -> OptionSpec? { options.first { $0.name == name } }

    /// A usage error of this command: "relora eval: MESSAGE; see `relora eval --help`".
    public func usageError(_ message: String) -> ReLoRAError {
        .usage("\(name): \(message); see `\(name) --help`")
    }
}

/// One option: a flag (`--json`), an option with one value (`--seq-len N`), or a repeatable one
/// (`--set key=value`, given any number of times).
public struct OptionSpec: Sendable {
    public enum Arity: Sendable { case flag, single, repeated }

    /// Without the dashes: "seq-len".
    public let name: String
    public let arity: Arity
    /// What the value is, in the usage text: "N", "DIR|FILE.gguf", "key=value"; "" for a flag.
    public let placeholder: String
    /// One or more sentences; wrapped to the usage text's width.
    public let help: String
    /// The value used when the option is not given, shown as "(default: ...)"; nil: none.
    public let defaultValue: String?
    /// Whether a command line without it is an error (for a repeatable option: without one of it).
    public let required: Bool
    /// The only values accepted, checked while parsing; empty: any.
    public let choices: [String]

    /// `--name`, true when given.
    public static func flag(_ name: String, help: String) -> OptionSpec {
        OptionSpec(name: name, arity: .flag, placeholder: "", help: help, defaultValue: nil, required: false, choices: [])
    }

    /// `--name VALUE` at most once. With `choices` and no placeholder, the placeholder is "a|b|c".
    public static func value(_ name: String, _ placeholder: String? = nil, help: String, default defaultValue: String? = nil,
                             required: Bool = false, choices: [String] = []) -> OptionSpec {
        precondition(placeholder != nil || !choices.isEmpty, "--\(name) needs a placeholder")
        precondition(defaultValue == nil || choices.isEmpty || choices.contains(defaultValue!), "--\(name): default not a choice")
        return OptionSpec(name: name, arity: .single, placeholder: placeholder ?? choices.joined(separator: "|"), help: help,
                          defaultValue: defaultValue, required: required, choices: choices)
    }

    /// `--name VALUE` any number of times, values kept in order.
    public static func repeated(_ name: String, _ placeholder: String, help: String, required: Bool = false) -> OptionSpec {
        OptionSpec(name: name, arity: .repeated, placeholder: placeholder, help: help, defaultValue: nil,
                   required: required, choices: [])
    }
}

/// The positional arguments a command takes: `count` of them, each shown as `placeholder`.
public struct PositionalSpec: Sendable {
    /// "RECIPE.json", "RUN_DIR", "CHECKPOINT|RUN_DIR".
    public let placeholder: String
    public let count: ClosedRange<Int>
    /// `count.upperBound` for "any number".
    public static let unbounded = Int.max

    public init(_ placeholder: String, count: ClosedRange<Int>) {
        self.placeholder = placeholder
        self.count = count
    }

    /// Exactly one.
    public static func one(_ placeholder: String) -> PositionalSpec { PositionalSpec(placeholder, count: 1...1) }
    /// None or one.
    public static func optional(_ placeholder: String) -> PositionalSpec { PositionalSpec(placeholder, count: 0...1) }
    /// One or more.
    public static func oneOrMore(_ placeholder: String) -> PositionalSpec { PositionalSpec(placeholder, count: 1...unbounded) }
}
