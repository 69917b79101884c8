//! Reading a VM's console log: split it into per-binary runs along the
//! `@@AG` markers that `init.rs` prints (the protocol is documented there).

const MARK: &str = "@@AG ";

/// One test binary's run as seen on the console.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BinaryRun {
    pub name: String,
    pub output: String,
    pub skips: String,
    /// `None` when its END marker never came.
    pub exit: Option<i32>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Console {
    pub kernel: Option<String>,
    pub lsm: Option<String>,
    pub warnings: Vec<String>,
    pub kmsg: Vec<String>,
    pub runs: Vec<BinaryRun>,
    pub done: bool,
}

#[derive(PartialEq)]
enum Section {
    Outside,
    Output,
    Skips,
    AfterSkips,
}

pub fn parse(log: &str) -> Console {
    let mut c = Console::default();
    let mut section = Section::Outside;
    for raw in log.lines() {
        let line = raw.trim_end_matches('\r');
        let (text, marker) = match line.find(MARK) {
            Some(at) => (&line[..at], Some(line[at + MARK.len()..].trim())),
            None => (line, None),
        };
        if let Some(run) = c
            .runs
            .last_mut()
            .filter(|_| marker.is_none() || !text.is_empty())
        {
            match section {
                Section::Output => {
                    run.output.push_str(text);
                    run.output.push('\n');
                }
                Section::Skips => {
                    run.skips.push_str(text);
                    run.skips.push('\n');
                }
                _ => {}
            }
        }
        let Some(marker) = marker else { continue };
        let (word, rest) = marker.split_once(' ').unwrap_or((marker, ""));
        let rest = rest.trim();
        match word {
            "KERNEL" => c.kernel = Some(rest.to_owned()),
            "LSM" => c.lsm = Some(rest.to_owned()),
            "WARN" => c.warnings.push(rest.to_owned()),
            "KMSG" => c.kmsg.push(rest.to_owned()),
            "DONE" => c.done = true,
            "BEGIN" => {
                c.runs.push(BinaryRun {
                    name: rest.to_owned(),
                    ..Default::default()
                });
                section = Section::Output;
            }
            "SKIPS-BEGIN" if section == Section::Output => section = Section::Skips,
            "SKIPS-END" if section == Section::Skips => section = Section::AfterSkips,
            "END" => {
                let mut parts = rest.split_whitespace();
                let name = parts.next().unwrap_or_default();
                let code = parts.next().and_then(|c| c.parse().ok());
                if let Some(run) = c.runs.last_mut().filter(|r| r.name == name) {
                    run.exit = code;
                }
                section = Section::Outside;
            }
            _ => {}
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_runs_along_markers() {
        let log = "[    0.1] boot noise\r\n\
            \r\n@@AG KERNEL 6.12.117+deb12-cloud-amd64\r\n\
            @@AG LSM lockdown,capability,landlock,yama,apparmor,tomoyo,bpf\r\n\
            \n@@AG BEGIN files\n\
            running 1 test\n\
            test a ... ok\n\
            no newline at end@@AG SKIPS-BEGIN files\n\
            {\"test\":\"a\",\"reason\":\"r\"}\n\
            \n@@AG SKIPS-END files\n\
            @@AG KMSG <4>[ 1.0] something\n\
            @@AG END files 0\n\
            \n@@AG BEGIN net\n\
            test b ... \n";
        let c = parse(log);
        assert_eq!(c.kernel.as_deref(), Some("6.12.117+deb12-cloud-amd64"));
        assert!(c.lsm.as_deref().is_some_and(|l| l.ends_with(",bpf")));
        assert_eq!(c.kmsg, vec!["<4>[ 1.0] something".to_owned()]);
        assert_eq!(c.runs.len(), 2);
        assert_eq!(c.runs[0].name, "files");
        assert_eq!(
            c.runs[0].output,
            "running 1 test\ntest a ... ok\nno newline at end\n"
        );
        assert_eq!(c.runs[0].skips, "{\"test\":\"a\",\"reason\":\"r\"}\n\n");
        assert_eq!(c.runs[0].exit, Some(0));
        assert_eq!(c.runs[1].exit, None);
        assert_eq!(c.runs[1].output, "test b ... \n");
        assert!(!c.done);
    }
}
